"""Report of the width re-run (keel issue 16, docs/results/width_scaling.md): the width exponent of the
optimal learning rate, fitted on an LR x width grid, and its transfer to a width outside the grid.

    python tools/experiments/width_report.py runs/width/grid runs/width/transfer --out docs/results \\
        --name width_scaling

The runs are tools/experiments/width_experiment.py's: conf/experiment/width_sweep.yaml at widths 32-512
on a sqrt(2)-spaced LR grid (seeds 1, 2, 3), and at the transfer width on other seeds (4, 5, 6).

1. The fit (`fit`) is tools/sweep_report.analyze over the grid: per width and seed the optimum (the grid
   minimum refined by a parabola in log-LR), the width's optimum (their geometric mean), the exponent with
   its 95% bootstrap interval (seeds resampled within widths, then widths) and the max stable LR. Added
   here: every per-seed optimum on an edge of its LRs, named (the lowest LR, the highest LR, or the highest
   stable one, below a failed run), and the sp_width rule's anchor: base width = the widest grid width,
   base LR = the fitted line there (less noisy than that width's own optimum).
2. The transfer (`transfer`): at the transfer width, the sp_width rule with the fitted alpha (and with the
   paper's 0.42, same anchor) against a global-LR search in sqrt(2) steps around the fitted rule's LR. The
   rule's own run is the search's centre point: under sp_width every group gets the same factor, so a
   global run at that peak LR would repeat it. Per seed, the rule's final validation loss minus that of the
   best searched LR (lowest mean over the seeds), with its 95% interval (stats.paired). The best LR is
   picked on the seeds it is compared on, which favours the search: a rule whose interval covers 0 against it
   is a conservative result (no difference shown; that is not equality). The fit's seeds and the transfer's
   are disjoint, so alpha and the anchor were not chosen on the seeds the transfer is reported on.
Writes NAME.json (provenance, the runs' validation digests, which must agree, fit, transfer) and NAME_loss_vs_lr.png, NAME_optimal_lr.png,
NAME_transfer.png, NAME_logits.png (when the monitors logged logits) into --out; prints markdown tables.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from optim import lr_rules
from pretrain.rundir import pyplot, write_json
from tools import sweep_report
from tools.experiments import ExperimentError
from tools.experiments.cli import guarded, report_parser
from tools.experiments.provenance import results_provenance
from tools.experiments.runs import FINISHED, NoRuns, load_runs
from tools.experiments.seeds import REPORTED_SEEDS
from tools.experiments.stats import Paired, paired
from tools.experiments.tables import fmt, markdown_table

PAPER_ALPHA = lr_rules.PAPER_ALPHA["adamw"]  # 0.42: Adam with trainable LayerNorm (GPT)
SIG_DIGITS = 4  # learning rates, exponents and init stds on command lines (and so in folder names)


def canonical(x: float) -> float:
    """`x` rounded to SIG_DIGITS significant digits: one spelling per value on every command line, so
    sqrt(2) steps computed twice never name two folders."""
    return float(f"{x:.{SIG_DIGITS}g}")


def load(folder: Path) -> list[sweep_report.Run]:
    """The finished runs below `folder` ([] when there are none yet)."""
    if not Path(folder).exists():
        return []
    return [r for r in sweep_report.load_runs(Path(folder)) if r.status in FINISHED]


# --- 1. The fit ---------------------------------------------------------------------------------------
def edge_name(run_lrs: list[float], curve: dict[float, float]) -> str | None:
    """Where one seed's minimum sits among the LRs it ran (`run_lrs`, its stable `curve`): None inside;
    "lowest LR"/"highest LR" at the grid's ends (the optimum may lie beyond), "highest stable LR" when a
    failed run lies above it (the optimum is at the stability edge; a wider grid cannot move it)."""
    best = min(curve, key=curve.get)
    if best == min(run_lrs):
        return "lowest LR"
    if best == max(run_lrs):
        return "highest LR"
    return "highest stable LR" if best == max(curve) else None


def fit(runs: list[sweep_report.Run], n_boot: int = 2000) -> dict:
    """sweep_report.analyze over the grid, with every edge optimum named and the sp_width anchor."""
    if not runs:
        raise NoRuns("no finished grid runs; run the grid stage first")
    summary = sweep_report.analyze(runs, n_boot)
    curves = sweep_report.seed_curves(runs)
    edges = []
    for width, by_seed in sorted(curves.items()):
        for seed, curve in sorted(by_seed.items()):
            lrs = [r.lr for r in runs if r.width == width and r.seed == seed]
            if where := edge_name(lrs, curve):
                edges.append({"width": width, "seed": seed, "lr": min(curve, key=curve.get), "edge": where})
    widths = sorted(int(w) for w, e in summary["widths"].items() if "opt_lr" in e)
    if len(widths) < 2:
        raise ExperimentError(f"the grid has an optimum at {len(widths)} width(s); a fit needs two or more")
    base_width = max(widths)
    return {**summary, "seeds": sorted({r.seed for r in runs}), "edges": edges,
            "anchor": {"base_width": base_width, "base_lr": canonical(sweep_report.fitted_lr(summary, base_width)),
                       "alpha": canonical(summary["alpha"])}}


def predicted_lr(anchor: dict, width: int, alpha: float) -> float:
    """The sp_width rule's peak LR at `width` from the fit's anchor (optim/lr_rules.py's formula)."""
    return lr_rules.transfer_lr(anchor["base_lr"], anchor["base_width"], width, alpha)


# --- 2. The transfer ----------------------------------------------------------------------------------
def transfer_arms(runs: list[sweep_report.Run], anchor: dict) -> dict[str, list[sweep_report.Run]]:
    """The transfer runs by arm: "fitted" and "paper" (sp_width with the anchor's alpha and with the
    paper's) and "search" (global LR; the fitted rule's runs are its centre point, see the module's doc).
    sp_width runs of another anchor (a stale fit) belong to no arm."""
    def rule(alpha: float) -> list[sweep_report.Run]:
        return [r for r in runs if r.lr_rule == "sp_width" and r.width_exponent == alpha
                and math.isclose(r.lr, predicted_lr(anchor, r.width, alpha), rel_tol=1e-9)]

    return {"fitted": rule(anchor["alpha"]), "paper": rule(PAPER_ALPHA),
            "search": [r for r in runs if r.lr_rule == "global"] + rule(anchor["alpha"])}


def by_lr(runs: list[sweep_report.Run]) -> dict[float, dict[int, float | None]]:
    """peak LR -> seed -> final validation loss (None when the run was not stable)."""
    out: dict[float, dict[int, float | None]] = {}
    for r in runs:
        out.setdefault(r.lr, {})[r.seed] = r.val_loss if r.stable else None
    return dict(sorted(out.items()))


def best_lr(grid: dict[float, dict[int, float | None]], seeds: list[int]) -> float:
    """The searched LR with the lowest mean loss among those every seed ran stably."""
    complete = {lr: statistics.fmean(v[s] for s in seeds) for lr, v in grid.items()
                if all(v.get(s) is not None for s in seeds)}
    if not complete:
        raise ExperimentError(f"no searched LR has a stable run on every seed {seeds}")
    return min(complete, key=complete.get)


def _pair(a: dict[int, float | None], b: dict[int, float | None]) -> Paired:
    """b - a per seed, over the seeds both ran stably."""
    return paired({s: v for s, v in a.items() if v is not None}, {s: v for s, v in b.items() if v is not None})


def transfer(runs: list[sweep_report.Run], fitted: dict) -> dict:
    """The transfer test: each rule's LR and loss per seed, the search grid, its optimum, and the paired
    differences rule - best searched LR (and paper - fitted)."""
    widths = {r.width for r in runs}
    if len(widths) != 1:
        raise ExperimentError(f"the transfer runs span widths {sorted(widths)}; expected one")
    width, anchor = widths.pop(), fitted["anchor"]
    arms = transfer_arms(runs, anchor)
    if not arms["fitted"]:
        raise ExperimentError(f"no sp_width run with the fitted alpha {anchor['alpha']} at width {width}; "
                              "run the transfer stage")
    if stray := sorted({r.seed for r in runs} - set(REPORTED_SEEDS)):
        raise ExperimentError(f"transfer seeds {stray} are not reported seeds ({REPORTED_SEEDS.start}-"
                              f"{REPORTED_SEEDS.stop - 1})")
    if shared := sorted({r.seed for r in runs} & set(fitted["seeds"])):
        raise ExperimentError(f"seeds {shared} ran both the grid and the transfer: alpha was fitted on them")
    search = by_lr(arms["search"])
    seeds = sorted({r.seed for r in arms["search"]})
    best = best_lr(search, seeds)
    curve = sweep_report.seed_curves(arms["search"]).get(width, {})
    opt, opt_edge = sweep_report.width_optimum(curve) if curve else (None, True)
    out = {"width": width, "anchor": anchor, "seeds": seeds, "search": {repr(lr): v for lr, v in search.items()},
           "best_searched_lr": best, "search_optimum": opt, "search_optimum_at_edge": opt_edge,
           "best_at_edge": best in (min(search), max(search)), "arms": {}}
    for name, alpha in (("fitted", anchor["alpha"]), ("paper", PAPER_ALPHA)):
        if arms[name]:
            losses = by_lr(arms[name])
            (lr, per_seed), = losses.items()  # one peak LR per rule
            out["arms"][name] = {"alpha": alpha, "lr": lr, "predicted_lr": predicted_lr(anchor, width, alpha),
                                 "lr_over_search_optimum": lr / opt if opt else None, "val_loss": per_seed,
                                 "minus_best_searched": _pair(search[best], per_seed).as_dict()}
    if {"fitted", "paper"} <= set(out["arms"]):
        fitted_losses, paper_losses = (out["arms"][name]["val_loss"] for name in ("fitted", "paper"))
        out["paper_minus_fitted"] = _pair(fitted_losses, paper_losses).as_dict()
    return out


# --- 3. Tables, plots, the JSON -----------------------------------------------------------------------
def fit_table(f: dict) -> str:
    rows = []
    for w, e in sorted(f["widths"].items(), key=lambda kv: int(kv[0])):
        seeds = ", ".join(f"{s}: {lr:.3g}{' (edge)' if e['seed_at_edge'][s] else ''}"
                          for s, lr in e.get("seed_opt_lrs", {}).items())
        stable = fmt(e.get("max_stable_lr"), ".3g") + (" (top of grid)" if e.get("max_stable_censored") else "")
        rows.append([w, len(e["losses"]), fmt(e.get("opt_lr"), ".3g"), seeds, fmt(e.get("best_val_loss"), ".4f"),
                     stable])
    lo, hi = f["exponent_ci"]
    return (markdown_table(["width", "LRs", "optimal LR", "per seed", "best val loss (seed mean)", "max stable LR"],
                           rows, "rrrlrl")
            + f"\n\nexponent {f['exponent']:.3f} (95% bootstrap interval {lo:.3f}..{hi:.3f}); "
            f"{len(f['edges'])} per-seed optimum(s) on an edge"
            + "".join(f"\n- width {e['width']}, seed {e['seed']}: minimum at the {e['edge']} ({e['lr']:.4g})"
                      for e in f["edges"]))


def transfer_table(t: dict) -> str:
    rows = [[f"search {float(lr):.4g}", *(fmt(v.get(s), ".4f") for s in t["seeds"])] for lr, v in t["search"].items()]
    for name, arm in t["arms"].items():
        d = arm["minus_best_searched"]
        interval = "no interval" if d["interval95"] is None else "{:+.4f}..{:+.4f}".format(*d["interval95"])
        rows.append([f"{name} alpha={arm['alpha']:g} (LR {arm['lr']:.4g})",
                     *(fmt(arm["val_loss"].get(s), ".4f") for s in t["seeds"])])
        diffs = dict(zip(d["seeds"], d["diffs"]))
        rows.append([f"{name} - best searched ({t['best_searched_lr']:.4g}): mean {d['mean']:+.4f}, 95% {interval}",
                     *(fmt(diffs.get(s), "+.4f") for s in t["seeds"])])
    return markdown_table(["width " + str(t["width"]), *(f"seed {s}" for s in t["seeds"])], rows)


def plot_transfer(t: dict, out: Path) -> None:
    """Left: loss vs LR at the transfer width, one thin line per seed, the seed mean with a min..max band,
    the rules' LRs marked. Right: each rule's per-seed difference from the best searched LR, with the
    mean's 95% interval."""
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4.0))
    lrs = [float(lr) for lr in t["search"]]
    for s in t["seeds"]:
        pts = [(lr, v[s]) for lr, v in zip(lrs, t["search"].values()) if v.get(s) is not None]
        ax.plot(*zip(*pts), "-", color="gray", lw=0.7, alpha=0.6)
    full = [(lr, [v[s] for s in t["seeds"]]) for lr, v in zip(lrs, t["search"].values())
            if all(v.get(s) is not None for s in t["seeds"])]
    ax.plot([lr for lr, _ in full], [statistics.fmean(v) for _, v in full], "o-", color="C0", label="seed mean")
    ax.fill_between([lr for lr, _ in full], [min(v) for _, v in full], [max(v) for _, v in full], color="C0", alpha=0.2)
    for (name, arm), color in zip(t["arms"].items(), ("C2", "C3")):
        ax.axvline(arm["lr"], color=color, ls="--", label=f"sp_width, {name} alpha={arm['alpha']:g}")
        d = arm["minus_best_searched"]
        x = list(t["arms"]).index(name)
        bx.plot([x] * len(d["diffs"]), d["diffs"], "o", color=color, alpha=0.6)
        if d["interval95"]:
            bx.errorbar([x], [d["mean"]], yerr=[[d["mean"] - d["interval95"][0]], [d["interval95"][1] - d["mean"]]],
                        fmt="s", color="k", capsize=5)
    ax.set(xscale="log", xlabel="peak learning rate", ylabel="final validation loss",
           title=f"width {t['width']}: search (grey: one seed)")
    ax.legend(fontsize=8)
    bx.axhline(0, color="gray", lw=0.8)
    bx.set_xticks(range(len(t["arms"])), [f"{n} alpha={a['alpha']:g}" for n, a in t["arms"].items()])
    bx.set(ylabel="loss - best searched LR's (per seed)", title="paired difference, mean and 95% interval")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def report(grid: Path, transfer_root: Path | None, out: Path, name: str, n_boot: int = 2000,
           commands: list[str] | None = None) -> dict:
    """The fit (and the transfer, when its runs exist): NAME.json and the plots into `out`."""
    grid_runs = load(grid)
    f = fit(grid_runs, n_boot)
    transfer_runs = load(transfer_root) if transfer_root else []
    t = transfer(transfer_runs, f) if transfer_runs else None
    roots = [grid, *([transfer_root] if transfer_runs else [])]
    origin = results_provenance(load_runs(*roots, statuses=FINISHED))  # refused before any file is written
    out.mkdir(parents=True, exist_ok=True)
    sweep_report.plot_loss_vs_lr(grid_runs, f, out / f"{name}_loss_vs_lr.png")
    sweep_report.plot_optimal_lr(f, out / f"{name}_optimal_lr.png")
    f["logit_plot"] = sweep_report.plot_logits(f, out / f"{name}_logits.png")
    if t:
        plot_transfer(t, out / f"{name}_transfer.png")
    result = {"provenance": {**origin["provenance"], "experiment_commands": commands or []},
              "val_digests": origin["val_digests"], "fit": f, "transfer": t}
    write_json(out / f"{name}.json", result, default=sweep_report._json_default)
    print(fit_table(f))
    if t:
        print("\n" + transfer_table(t))
    return result


def main(argv: list[str] | None = None) -> int:
    p = report_parser(__doc__, name="width_scaling")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap replicates of the exponent's interval")
    args = p.parse_args(argv)
    if len(args.roots) > 2:
        p.error("give the grid's folder and, optionally, the transfer's")
    grid, transfer_root = args.roots[0], (args.roots[1] if len(args.roots) == 2 else None)
    return guarded(lambda: report(grid, transfer_root, args.out, args.name, args.bootstrap))


if __name__ == "__main__":
    raise SystemExit(main())
