"""Aggregate MoE runs into a results JSON and plots: β and γ chosen apart on tuning seeds, arms paired with aux only.

    python tools/experiments/moe_report.py runs/moe_continue --pretrained runs/moe_pretrain --out docs/results

tools/experiments/moe_experiment.py runs the experiment of issue 37 (docs/results/moe.md; the paper's
setting: an MoE pretrained with the auxiliary loss only, continued with aux only, + L_o, + L_v and + both)
and calls this report as its last stage; any MoE run folders can be given (the earlier runs too).

- Arms come from each run's config (`arm_of`): dense (no experts), aux only, or aux plus the
  specialisation terms that are on. Runs on tuning seeds (100-199) only choose β and γ, each from the runs
  with that loss alone on (`choose`, the rule in SELECTION, `at_edge` when the choice is the smallest or
  largest value tried); runs on reported seeds (1-99) are summarised and paired. Nothing else chooses.
- Per run (`run_metrics`): the last evaluation's validation losses (val_loss, and val_loss/SOURCE for each
  named validation set) and routing by source (purity, purity/SOURCE and source_nmi: models/moe/stats.py,
  a specialisation measure no loss optimises); the training steps' router statistics (overlap, routing
  variance, MaxVio, ...) averaged over the last `--tail` of logged steps, since single steps are noisy.
  Each also per MoE layer (layerN/...).
- Every arm against aux only, seed by seed: the mean difference, its 95% interval and a verdict
  (stats.paired); validation losses also with TOST at ±LOSS_MARGIN nats (equivalent, or inconclusive).
- Expert indices mean nothing across seeds (which expert learns what is arbitrary), so the per-expert
  figures sort each seed's experts by load within each layer first and average rank by rank.

Writes NAME.json (with provenance), NAME_curves.png (mean over seeds with a min..max band against the
step), NAME_paired.png (per-seed differences against aux only, with their interval), NAME_load_heatmap.png
and NAME_source_routing.png into --out.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Iterable

from pretrain.rundir import pyplot, write_json
from tools.experiments import ExperimentError
from tools.experiments.cli import guarded, report_parser
from tools.experiments.provenance import results_provenance
from tools.experiments.runs import Run, by_arm, load_runs, per_seed
from tools.experiments.seeds import reported_runs, select, tuning_runs
from tools.experiments.stats import paired, summarize
from tools.experiments.tables import fmt, markdown_table, mean_std

STATS = ("overlap", "routing_var", "maxvio", "entropy", "weight_sim", "dropped")  # training steps, tail means
ROUTING = ("purity", "source_nmi")  # routing by source, at each evaluation
DENSE = "dense"
BASELINE = "aux only"
LOSSES = {"ortho_loss": "β", "var_loss": "γ"}  # model.moe's coefficient of L_o and of L_v, and its symbol
SELECTION = ("each of β and γ on its own: among the tuning runs with that loss alone on (the other coefficient 0), "
             "the value with the lowest mean final val_loss (both sources' held-out files, interleaved) over the "
             "tuning seeds (seeds.select); a value that did not complete every tuning seed (one diverged) is out. "
             "A choice at the smallest or largest value tried is at_edge. Aux only is no candidate, and no "
             "specialisation statistic takes part, so nothing reported is selected for.")
LOSS_MARGIN = 0.005  # nats: a validation loss within ±this of aux only (TOST) is equivalent; fixed before issue 37
CURVES = ("val_loss", "purity", "source_nmi", "overlap", "routing_var", "maxvio")  # panels, one per key


# --- Runs -----------------------------------------------------------------------------------------
def arm_of(run: Run) -> str:
    moe = run.config["model"]["moe"]
    if not moe["num_experts"]:
        return DENSE
    terms = [f"ortho (beta={moe['ortho_loss']:g})"] * bool(moe["ortho_loss"]) + \
            [f"var (gamma={moe['var_loss']:g})"] * bool(moe["var_loss"])
    return " + ".join(["aux"] + terms) if terms else BASELINE


def sources_of(runs: Iterable[Run]) -> list[str]:
    """The named validation sets (data.val_sets) of the runs, in config order: the sources."""
    names: dict[str, None] = {}
    for run in runs:
        names.update({v["name"]: None for v in run.config.get("data", {}).get("val_sets", [])})
    return list(names)


def layers_of(run: Run) -> list[int]:
    """The MoE layers a run logged statistics for."""
    return sorted({int(k.split("/")[1].removeprefix("layer")) for row in run.rows for k in row
                   if k.startswith("moe/layer")})


def tail_mean(run: Run, key: str, tail: float) -> float | None:
    """Mean of the last `tail` fraction (at least one) of the logged values of `key`."""
    values = run.values(key)
    if not values:
        return None
    n = max(1, int(len(values) * tail))
    return statistics.fmean(values[-n:])


def run_metrics(run: Run, sources: list[str], tail: float) -> dict[str, float]:
    """The run's numbers by name: final validation losses and routing by source, tail means of the router
    statistics; each MoE statistic also per layer (layerN/...). Keys a run did not log are left out."""
    final = ["val_loss", *(f"val_loss/{s}" for s in sources)]
    routing = [*ROUTING, *(f"purity/{s}" for s in sources)]
    prefixes = ["", *(f"layer{n}/" for n in layers_of(run))]
    out = {key: run.last(key) for key in final}
    for p in prefixes:
        out |= {f"{p}{key}": run.last(f"moe/{p}{key}") for key in routing}
        out |= {f"{p}{key}": tail_mean(run, f"moe/{p}{key}", tail) for key in STATS}
    return {k: v for k, v in out.items() if v is not None}


# --- Choosing β and γ apart on tuning seeds --------------------------------------------------------
def alone(run: Run, loss: str) -> float | None:
    """The coefficient of `loss` when it is the only specialisation loss on in the run, else None."""
    moe = run.config["model"]["moe"]
    others = [moe[k] for k in LOSSES if k != loss]
    return float(moe[loss]) if moe["num_experts"] and moe[loss] and not any(others) else None


def choose(runs: Iterable[Run], loss: str) -> dict | None:
    """The value of `loss` (a key of LOSSES) SELECTION picks from the completed runs on tuning seeds with that
    loss alone on, every value's final val_loss, and whether the choice is at the edge of the values tried;
    None without a candidate."""
    candidates = by_arm((r for r in tuning_runs(runs) if alone(r, loss) is not None), lambda r: alone(r, loss))
    if not candidates:
        return None
    seeds = sorted(set().union(*candidates.values()))
    complete = {value: by_seed for value, by_seed in candidates.items() if sorted(by_seed) == seeds}
    if not complete:
        raise ExperimentError(f"no {LOSSES[loss]} ({loss}) candidate completed every tuning seed {seeds}; see the "
                              "runs' result.json")
    value = select(complete, lambda r: r.last("val_loss"))
    table = {}
    for v, by_seed in sorted(candidates.items()):
        finals = per_seed(by_seed, lambda r: r.last("val_loss"))
        table[f"{v:g}"] = {"seeds": sorted(by_seed), "val_loss": summarize(finals.values()) if finals else None,
                           "candidate": v in complete}
    tried = sorted(candidates)
    return {"rule": SELECTION, "loss": loss, "seeds": seeds, "chosen": value, "values": tried,
            "at_edge": value in (tried[0], tried[-1]), "arm": arm_of(next(iter(complete[value].values()))),
            "candidates": table}


def tuning(runs: Iterable[Run]) -> dict | None:
    """loss -> `choose` for each of L_o and L_v that has tuning runs; None when neither has."""
    runs = list(runs)
    chosen = {loss: c for loss in LOSSES if (c := choose(runs, loss))}
    return chosen or None


# --- Summaries and pairs over reported seeds --------------------------------------------------------
def per_arm(arms: dict[str, dict[int, Run]], sources: list[str], tail: float) -> dict[str, dict[int, dict]]:
    """arm -> seed -> run_metrics."""
    return {arm: {seed: run_metrics(run, sources, tail) for seed, run in runs.items()} for arm, runs in arms.items()}


def summarize_arms(metrics: dict[str, dict[int, dict]]) -> dict[str, dict[str, dict]]:
    """arm -> metric -> stats.summarize over the arm's seeds."""
    out = {}
    for arm, by_seed in metrics.items():
        names = dict.fromkeys(k for m in by_seed.values() for k in m)
        out[arm] = {k: summarize(m[k] for m in by_seed.values() if k in m) for k in names}
    return out


def paired_with_baseline(metrics: dict[str, dict[int, dict]], baseline: str = BASELINE) -> dict[str, dict]:
    """arm -> metric -> its per-seed value minus the baseline's, the mean, 95% interval and verdict; for
    the metrics both arms logged, over the seeds both ran. Validation losses also get their TOST at
    ±LOSS_MARGIN, so "no worse" can be shown rather than read from an interval that covers 0."""
    if baseline not in metrics:
        return {}
    out = {}
    for arm in (a for a in metrics if a != baseline):
        names = dict.fromkeys(k for m in metrics[arm].values() for k in m)
        out[arm] = {}
        for key in names:
            a, b = ({s: m[key] for s, m in metrics[x].items() if key in m} for x in (baseline, arm))
            if a.keys() & b.keys():
                margin = LOSS_MARGIN if key.split("/")[0] == "val_loss" else None
                out[arm][key] = paired(a, b).as_dict(margin)
    return out


def pretrained_metrics(folder: Path, sources: list[str], tail: float) -> dict:
    """The pretrained run's final numbers: the continued runs' step 0 (the same weights and validation rows)."""
    run = next((r for r in load_runs(folder) if r.folder == Path(folder)), None)
    if run is None:
        raise ExperimentError(f"{folder} is not a finished run folder (run_info.json beside result.json); point "
                              "--pretrained at the pretraining run")
    return {"folder": str(folder), "step": max(run.series("val_loss"), default=None),
            "metrics": run_metrics(run, sources, tail), "run": run}


def build(roots: list[Path], tail: float, pretrained: Path | None = None) -> dict:
    """The whole report as a dict (the `_runs` entry holds the Run objects for the plots; not written)."""
    runs = load_runs(*roots)
    reported = reported_runs(runs)
    if not reported:
        raise ExperimentError(f"no run below {', '.join(map(str, roots))} has a reported seed (1-99); "
                              "run the reported arms (tools/experiments/moe_experiment.py --stage continue)")
    sources = sources_of(runs)
    arms = by_arm(reported, arm_of)
    metrics = per_arm(arms, sources, tail)
    pre = pretrained_metrics(pretrained, sources, tail) if pretrained else None
    everything = runs + ([pre["run"]] if pre else [])
    origin = results_provenance(everything)
    return {"provenance": origin["provenance"], "sources": sources,
            "tuning": tuning(runs), "arms": summarize_arms(metrics), "per_seed": metrics,
            "paired_vs_aux_only": paired_with_baseline(metrics),
            "pretrained": {k: v for k, v in pre.items() if k != "run"} if pre else None,
            "val_digests": origin["val_digests"], "tail": tail,
            "_runs": {"arms": arms, "pretrained": pre["run"] if pre else None}}


# --- Tables and plots -------------------------------------------------------------------------------
def table(report: dict) -> str:
    cols = ["val_loss", *(f"val_loss/{s}" for s in report["sources"]), *ROUTING, "overlap", "routing_var", "maxvio"]
    rows = [[arm, max((v["n"] for v in m.values()), default=0),
             *(mean_std(m[c]["mean"], m[c]["std"]) if c in m else fmt(None) for c in cols)]
            for arm, m in report["arms"].items()]
    return markdown_table(["arm", "seeds", *cols], rows)


def paired_lines(report: dict) -> list[str]:
    lines = []
    for arm, by_metric in report["paired_vs_aux_only"].items():
        for key in ("val_loss", *(f"val_loss/{s}" for s in report["sources"]), *ROUTING, "overlap", "routing_var",
                    "maxvio"):
            if p := by_metric.get(key):
                ci = f"[{p['interval95'][0]:+.4f}, {p['interval95'][1]:+.4f}]" if p["interval95"] else "no interval"
                lines.append(f"{arm} - {BASELINE}: {key} {p['mean']:+.4f} {ci} over seeds {p['seeds']}: {p['verdict']}")
    return lines


def summary(result: dict, out: Path, name: str) -> str:
    """What the console shows of a written report: the table, the paired differences, the choice, the files."""
    lines = [table(result), *paired_lines(result)]
    for loss, choice in (result["tuning"] or {}).items():
        edge = " (at the edge of the values tried)" if choice["at_edge"] else ""
        lines.append(f"{LOSSES[loss]} ({loss}) chosen on tuning seeds {choice['seeds']} from "
                     f"{', '.join(f'{v:g}' for v in choice['values'])}: {choice['chosen']:g}{edge}")
    lines.append(f"wrote {out / (name + '.json')} and {', '.join(result['figures'].values())}")
    return "\n".join(lines)


def band(runs: Iterable[Run], key: str, start: float | None = None) -> dict | None:
    """Mean, min and max over seeds of `key` at the steps every seed logged; `start` adds step 0, unless the
    runs logged their own (the validation before step 1 of an init_from run)."""
    series = [run.series(key) for run in runs]
    steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
    if not steps:
        return None
    at = [[s[t] for s in series] for t in steps]
    out = {"step": steps, "mean": [statistics.fmean(v) for v in at], "min": [min(v) for v in at],
           "max": [max(v) for v in at]}
    if start is None or steps[0] == 0:
        return out
    return {k: [0 if k == "step" else start, *v] for k, v in out.items()}


def plot_curves(report: dict, out: Path) -> None:
    """One panel per key in CURVES (and per source's validation loss): each arm's mean over seeds with its
    min..max band; evaluation metrics start at step 0 from the pretrained model when there is one."""
    plt = pyplot()
    arms, pre = report["_runs"]["arms"], report["_runs"]["pretrained"]
    keys = [CURVES[0], *(f"val_loss/{s}" for s in report["sources"]), *CURVES[1:]]
    evaluated = {"val_loss", *ROUTING}
    cols = min(4, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    for ax, key in zip(axes.flat, keys):
        metric = key if key.startswith("val_loss") else f"moe/{key}"
        for arm, runs in arms.items():
            start = pre.last(metric) if pre and key.split("/")[0] in evaluated else None
            if b := band(runs.values(), metric, start):
                line, = ax.plot(b["step"], b["mean"], lw=1.2, marker="o" if len(b["step"]) < 12 else None, ms=3,
                                label=f"{arm} (n={len(runs)})")
                ax.fill_between(b["step"], b["min"], b["max"], color=line.get_color(), alpha=0.2)
        ax.set_xlabel("step" + (" (0: the pretrained model)" if pre else ""))
        ax.set_title(key, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean over seeds; band = min..max")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_paired(report: dict, out: Path) -> None:
    """Per metric: each arm's per-seed difference from aux only, its mean and 95% interval."""
    pairs = report["paired_vs_aux_only"]
    keys = [k for k in ("val_loss", *(f"val_loss/{s}" for s in report["sources"]), *ROUTING, "overlap",
                        "routing_var", "maxvio") if any(k in p for p in pairs.values())]
    if not keys:
        return
    plt = pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(2.6 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, (arm, by_metric) in enumerate(pairs.items()):
            if p := by_metric.get(key):
                ax.scatter([i] * len(p["diffs"]), p["diffs"], s=16, zorder=3)
                if p["interval95"]:
                    lo, hi = p["interval95"]
                    ax.errorbar([i + 0.2], [p["mean"]], yerr=[[p["mean"] - lo], [hi - p["mean"]]], fmt="s", capsize=4,
                                color="black")
        ax.axhline(0.0, color="tab:blue", lw=1)
        ax.set_xticks(range(len(pairs)), [a.replace(" + ", "\n+ ") for a in pairs], fontsize=6)
        ax.set_title(f"{key} minus aux only", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def ranked_mean(matrices: list[list[list[float]]], order: list[list[int]]) -> list[list[float]]:
    """Average per-seed [rows, experts] matrices after putting each seed's experts in its own `order`."""
    ranked = [[[row[e] for e in o] for row in m] for m, o in zip(matrices, order)]
    return [[statistics.fmean(col) for col in zip(*rows)] for rows in zip(*ranked)]


def by_load(loads: list[float]) -> list[int]:
    return sorted(range(len(loads)), key=lambda e: -loads[e])


def plot_load_heatmaps(arms: dict[str, dict[int, Run]], tail: float, out: Path) -> None:
    """Per MoE arm: layers x experts ranked by load, the share of routed tokens over the last `tail` of
    training. Each seed's experts are sorted by load within each layer first, then seeds are averaged
    rank by rank."""
    plt = pyplot()
    grids = {}
    for arm, by_seed in arms.items():
        runs = list(by_seed.values())
        experts, layers = runs[0].config["model"]["moe"]["num_experts"], layers_of(runs[0])
        grid = []
        for layer in layers:
            loads = [[tail_mean(run, f"moe/layer{layer}/load/{e}", tail) or 0.0 for e in range(experts)]
                     for run in runs]
            grid.append(ranked_mean([[load] for load in loads], [by_load(load) for load in loads])[0])
        grids[arm] = (layers, experts, grid)
    vmax = max(max(max(row) for row in g[2]) for g in grids.values())  # one colour scale for all arms
    fig, axes = plt.subplots(1, len(grids), figsize=(5.5 * len(grids), 2.8), squeeze=False)
    for ax, (arm, (layers, experts, grid)) in zip(axes[0], grids.items()):
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_yticks(range(len(layers)), [f"layer {l}" for l in layers])
        ax.set_xticks(range(experts))
        ax.set_xlabel("expert, ranked by load within each seed (busiest first)")
        ax.set_title(f"{arm} (n={len(arms[arm])})", fontsize=8)
        fig.colorbar(im, ax=ax, label="share of routed tokens")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_source_routing(arms: dict[str, dict[int, Run]], sources: list[str], out: Path) -> bool:
    """One row per MoE arm, one column per layer: sources x experts, each source's share of its routed
    assignments at the last evaluation, experts ranked by their load over all sources within each seed.
    False when no run logged routing by source."""
    grids: dict[str, dict[int, list]] = {}
    for arm, by_seed in arms.items():
        runs = list(by_seed.values())
        experts = runs[0].config["model"]["moe"]["num_experts"]
        for layer in layers_of(runs[0]):
            shares = [[[run.last(f"moe/layer{layer}/routed/{s}/{e}") for e in range(experts)] for s in sources]
                      for run in runs]
            if sources and not any(x is None for m in shares for row in m for x in row):
                order = [by_load([sum(col) for col in zip(*m)]) for m in shares]
                grids.setdefault(arm, {})[layer] = ranked_mean(shares, order)
    if not grids:
        return False
    plt = pyplot()
    layers = sorted({layer for g in grids.values() for layer in g})
    vmax = max(max(row) for g in grids.values() for grid in g.values() for row in grid)  # one colour scale
    size = (4.2 * len(layers) + 1.5, (0.35 * len(sources) + 1.2) * len(grids))
    fig, axes = plt.subplots(len(grids), len(layers), figsize=size, squeeze=False, layout="constrained")
    for row, (arm, by_layer) in zip(axes, grids.items()):
        for ax, layer in zip(row, layers):
            if layer not in by_layer:
                ax.axis("off")
                continue
            im = ax.imshow(by_layer[layer], aspect="auto", cmap="magma", vmin=0, vmax=vmax)
            ax.set_yticks(range(len(sources)), sources, fontsize=7)
            ax.set_xticks(range(len(by_layer[layer][0])))
            ax.set_title(f"{arm} (n={len(arms[arm])}), layer {layer}", fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("expert, ranked by load within each seed", fontsize=7)
    fig.colorbar(im, ax=axes, label="share of the source's\nrouted assignments")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def write(report: dict, out: Path, name: str, extra: dict | None = None) -> dict:
    """NAME.json and the figures into `out`; `extra` adds keys to the JSON (the driver's setup)."""
    out.mkdir(parents=True, exist_ok=True)
    runs = report.pop("_runs")
    report["figures"] = {}
    moe_arms = {a: r for a, r in runs["arms"].items() if a != DENSE}
    figures = {"curves": lambda p: plot_curves({**report, "_runs": runs}, p),
               "paired": lambda p: plot_paired(report, p)}
    if moe_arms:
        figures |= {"load_heatmap": lambda p: plot_load_heatmaps(moe_arms, report["tail"], p),
                    "source_routing": lambda p: plot_source_routing(moe_arms, report["sources"], p)}
    for key, draw in figures.items():
        path = out / f"{name}_{key}.png"
        if draw(path) is not False and path.exists():
            report["figures"][key] = path.name
    report |= extra or {}
    write_json(out / f"{name}.json", report)
    return report


def main(argv: list[str] | None = None) -> int:
    p = report_parser(__doc__, name="moe")
    p.add_argument("--tail", type=float, default=0.2, help="fraction of logged steps averaged for router statistics")
    p.add_argument("--pretrained", type=Path, help="the run the others continued from: their step 0")
    args = p.parse_args(argv)

    def report() -> None:
        if args.pretrained and not (args.pretrained / "result.json").exists():
            raise ExperimentError(f"--pretrained {args.pretrained} holds no finished run (result.json); "
                                  "point it at the pretraining run folder, or leave it out")
        print(summary(write(build(args.roots, args.tail, args.pretrained), args.out, args.name), args.out, args.name))

    return guarded(report)


if __name__ == "__main__":
    raise SystemExit(main())
