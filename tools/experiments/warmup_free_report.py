"""Summarise warmup-free runs: is warmup needed, and does the spectral bound replace it?

    python tools/experiments/warmup_free_report.py runs/warmup_free [MORE_ROOTS ...] --out docs/results \
        --name warmup_free [--tune-at 1e-2]

The runs (docs/results/warmup_free.md) are Hydra multiruns of the warmup_free presets. Seeds split the
work (tools/experiments/seeds.py and stats.py): on TUNING_SEEDS the warmup length of AdamW and the τ of the bound
are chosen at lr --tune-at, and higher rates are probed; on REPORTED_SEEDS every method runs on one
learning-rate grid with the chosen values, and only those runs are compared.

A run's method comes from its config: "adamw" (no warmup), "adamw + warmup N", "spectral τ=T" (no
warmup) or "quack". A run is stable when it completed and its training loss never rose above its
first step's loss after step 5 (AdamW without warmup at a high rate jumps far above ln V). Per
(lr, method) on reported seeds: the final validation loss per seed, its mean, how many seeds stayed
stable, and the per-seed paired difference against AdamW with warmup at the same rate (mean and 95%
interval). Per method: its best rate (lowest mean), the loss there, the highest rate at which every
seed stayed stable, and the paired difference of its best against warmup's best. Writes NAME.json and
NAME.png into --out and prints markdown tables; runs without a result.json are still going and left out.
"""

from __future__ import annotations

from pathlib import Path

from pretrain.rundir import pyplot, write_json
from tools.experiments.cli import guarded, report_parser
from tools.experiments.preregistration import WARMUP_LONG, WarmupDesign, at_edge, tuned_grid
from tools.experiments.provenance import results_provenance
from tools.experiments.runs import FINISHED, Run, by_arm, load_runs, per_seed
from tools.experiments.seeds import reported_runs, select, tuning_runs
from tools.experiments.stats import paired, summarize
from tools.experiments.tables import MISSING, fmt, markdown_table

SPIKE_AFTER = 5  # steps; the first few losses of any run sit near ln V


def method(config: dict) -> str:
    optim, warmup = config["optim"], config["lr"]["warmup_steps"]
    if optim.get("quack"):
        return "quack"
    if optim["spectral"]["enabled"]:
        return f"spectral τ={optim['spectral']['tau']:g}"
    return f"adamw + warmup {warmup}" if warmup > 0 else "adamw"


def is_warmup(name: str) -> bool:
    return name.startswith("adamw + warmup")


def arm_of(run: Run) -> tuple[float, str]:
    return run.config["optim"]["lr"], method(run.config)


def final_val(run: Run) -> float | None:
    return run.last("val_loss")


def stable(run: Run) -> bool:
    """Completed, and no training loss after step SPIKE_AFTER above the first step's loss."""
    losses = run.values("loss")
    return run.status == "completed" and bool(losses) and max(run.values("loss", after=SPIKE_AFTER),
                                                               default=losses[0]) <= losses[0]


def summarize_run(run: Run) -> dict:
    return {"run": run.name, "method": method(run.config), "lr": run.config["optim"]["lr"], "seed": run.seed,
            "status": run.status, "stable": stable(run), "steps": max((r["step"] for r in run.rows), default=0),
            "final_val_loss": final_val(run), "first_loss": next(iter(run.values("loss")), None),
            "max_train_loss_after_step5": max(run.values("loss", after=SPIKE_AFTER), default=None),
            "min_attention_entropy": min(run.values("stability/attn_entropy_min"), default=None),
            "max_qk_sigma1": max(run.values("stability/qk_sigma1_max"), default=None)}


# 1. Tuning seeds: the warmup length and τ, each chosen by its mean final validation loss at one rate
def choose(runs: list[Run], tune_at: float) -> dict:
    at = [r for r in tuning_runs(runs) if r.config["optim"]["lr"] == tune_at]
    chosen = {"lr": tune_at, "seeds": sorted({r.seed for r in at})}
    for key, kind in (("warmup", is_warmup), ("spectral", lambda m: m.startswith("spectral"))):
        candidates = by_arm((r for r in at if kind(method(r.config))), lambda r: method(r.config))
        chosen[key] = select(candidates, final_val) if candidates else None
    return chosen


# 2. Reported seeds: every (lr, method), paired against warmup at the same rate
def pair(a: dict[int, float], b: dict[int, float]) -> dict | None:
    if not a.keys() & b.keys():
        return None
    return paired(a, b).as_dict()


def grid(runs: list[Run]) -> list[dict]:
    """One row per (lr, method), highest lr first."""
    arms = by_arm(reported_runs(runs), arm_of)
    losses = {arm: per_seed(by_seed, final_val) for arm, by_seed in arms.items()}
    rows = []
    for (lr, name), by_seed in sorted(arms.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        if not losses[lr, name]:
            continue
        warmup = next((losses[a] for a in losses if a[0] == lr and is_warmup(a[1]) and a[1] != name), None)
        rows.append({"lr": lr, "method": name, "seeds": list(losses[lr, name]),
                     "val_loss": list(losses[lr, name].values()), "mean": summarize(losses[lr, name].values())["mean"],
                     "stable_seeds": sum(stable(r) for r in by_seed.values()), "n": len(by_seed),
                     "vs_warmup": pair(warmup, losses[lr, name]) if warmup else None})
    return rows


def per_method(runs: list[Run], rows: list[dict]) -> dict:
    """method -> best rate, its loss, the highest rate at which every seed stayed stable, and its best
    against warmup's best, seed by seed."""
    arms = by_arm(reported_runs(runs), arm_of)
    out = {}
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        best = min(mine, key=lambda r: r["mean"])
        stable_lrs = [r["lr"] for r in mine if r["stable_seeds"] == r["n"]]
        out[name] = {"best_lr": best["lr"], "best_mean": best["mean"], "best_val_loss": best["val_loss"],
                     "highest_stable_lr": max(stable_lrs, default=None), "lrs": sorted(r["lr"] for r in mine)}
    warmup = next((m for m in out if is_warmup(m)), None)
    for name, m in out.items():
        if warmup and name != warmup:
            a, b = arms[out[warmup]["best_lr"], warmup], arms[m["best_lr"], name]
            m["best_vs_warmup_best"] = pair(per_seed(a, final_val), per_seed(b, final_val))
    return out


# 3. Tables and the plot
def interval(p: dict | None) -> str:
    if not p:
        return "—"
    ci = f" [{p['interval95'][0]:+.3f}, {p['interval95'][1]:+.3f}]" if p["interval95"] else ""
    return f"{p['mean']:+.3f}{ci}"


def tables(runs: list[dict], rows: list[dict], methods: dict, chosen: dict) -> str:
    tuning = markdown_table(
        ["lr", "method", "seed", "final val", "stable", "max train loss after step 5"],
        [[f"{r['lr']:g}", r["method"], r["seed"], fmt(r["final_val_loss"]), "yes" if r["stable"] else "no",
          fmt(r["max_train_loss_after_step5"], ".2f")]
         for r in sorted(runs, key=lambda r: (-r["lr"], r["method"])) if r["seed"] >= 100], align="lllrlr")
    summary = markdown_table(
        ["lr", "method", "final val loss per seed", "mean", "stable seeds", "minus warmup (95% CI)"],
        [[f"{r['lr']:g}", r["method"], ", ".join(f"{v:.3f}" for v in r["val_loss"]), f"{r['mean']:.3f}",
          f"{r['stable_seeds']}/{r['n']}", interval(r["vs_warmup"])] for r in rows], align="lllrrr")
    best = markdown_table(
        ["method", "best lr", "best mean val loss", "highest stable lr", "best minus warmup's best (95% CI)"],
        [[name, f"{m['best_lr']:g}", f"{m['best_mean']:.3f}", fmt(m["highest_stable_lr"], "g"),
          interval(m.get("best_vs_warmup_best"))] for name, m in methods.items()], align="lrrrr")
    per_run = markdown_table(
        ["run", "status", "stable", "final val", "max train loss after step 5", "min attention entropy",
         "max σ1(W_qᵀW_k)"],
        [[r["run"], r["status"], "yes" if r["stable"] else "no", fmt(r["final_val_loss"]),
          fmt(r["max_train_loss_after_step5"], ".2f"), fmt(r["min_attention_entropy"], ".2f"),
          fmt(r["max_qk_sigma1"], ".2f")]
         for r in sorted(runs, key=lambda r: (-r["lr"], r["method"], r["seed"]))], align="lllrrrr")
    return (f"chosen on tuning seeds {chosen['seeds']} at lr {chosen['lr']:g}: {chosen['warmup']}, "
            f"{chosen['spectral']}\n\n{tuning}\n\n{summary}\n\n{best}\n\n{per_run}")


def plot(runs: list[Run], rows: list[dict], path, curves_at: float) -> None:
    plt = pyplot()
    fig, (by_lr, curves) = plt.subplots(1, 2, figsize=(13, 4.5))
    names = list(dict.fromkeys(r["method"] for r in rows))
    colors = dict(zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for name in names:
        mine = sorted((r for r in rows if r["method"] == name), key=lambda r: r["lr"])
        lrs = [r["lr"] for r in mine]
        by_lr.plot(lrs, [r["mean"] for r in mine], marker="o", color=colors[name], label=name)
        by_lr.fill_between(lrs, [min(r["val_loss"]) for r in mine], [max(r["val_loss"]) for r in mine],
                           color=colors[name], alpha=0.2)
    by_lr.set_xscale("log")
    by_lr.set_xlabel("peak learning rate")
    by_lr.set_ylabel("final validation loss (band: min..max over seeds)")
    by_lr.set_title("reported seeds: final validation loss against rate")
    by_lr.grid(alpha=0.3)
    by_lr.legend(fontsize=8)
    for (lr, name), by_seed in by_arm(reported_runs(runs), arm_of).items():
        if lr != curves_at:
            continue
        series = [run.series("loss") for run in by_seed.values()]
        steps = sorted(set.intersection(*(set(s) for s in series)))
        values = [[s[t] for s in series] for t in steps]
        curves.plot(steps, [sum(v) / len(v) for v in values], color=colors.get(name), lw=1, label=name)
        curves.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=colors.get(name),
                            alpha=0.2)
    curves.set_yscale("log")
    curves.set_xlabel("step")
    curves.set_ylabel("training loss (mean; band: min..max over seeds)")
    curves.set_title(f"training loss at lr {curves_at:g}")
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(roots: list[Path], out: Path, name: str, tune_at: float) -> dict:
    """Read the runs below `roots`, write NAME.json and NAME.png into `out`, print the tables."""
    runs = load_runs(*roots, statuses=FINISHED)
    origin = results_provenance(runs)  # refused before any file is written
    per_run = [summarize_run(run) for run in runs]
    chosen = choose(runs, tune_at)
    rows = grid(runs)
    methods = per_method(runs, rows)
    out.mkdir(parents=True, exist_ok=True)
    result = {**origin, "roots": [str(r) for r in roots], "chosen": chosen, "grid": rows, "methods": methods,
              "runs": per_run}
    write_json(out / f"{name}.json", result)
    if rows:
        plot(runs, rows, out / f"{name}.png", tune_at)
    print(tables(per_run, rows, methods, chosen))
    return result


# 4. The long design (preregistration.WARMUP_LONG): each method at its own choice, judged at a registered margin
ADAMW, WARMUP, SPECTRAL = "adamw", "adamw + warmup", "spectral"  # the methods, whatever their length or τ
KNOBS = {ADAMW: None, WARMUP: ("lr", "warmup_steps"), SPECTRAL: ("optim", "spectral", "tau")}


def family(config: dict) -> str:
    name = method(config)
    return WARMUP if is_warmup(name) else SPECTRAL if name.startswith("spectral") else name


def knob(config: dict):
    """A run's warmup length (AdamW + warmup) or τ (the bound); None for AdamW without warmup."""
    value = config
    for part in KNOBS[family(config)] or ():
        value = value[part]
    return value if KNOBS[family(config)] else None


def bounds(design: WarmupDesign, name: str) -> dict:
    """How far an extension may go: a warmup of at most half the run, a τ of at most 1."""
    return {"high": design.steps // 2, "integer": True} if name == WARMUP else {"high": 1.0}


def choose_long(runs: list[Run], design: WarmupDesign) -> dict[str, dict]:
    """method -> its choice on the tuning seeds: the length or τ at lr tune_at ("value", on "values", the grid
    with its extensions), then the rate at that value ("lr" on "lrs"); whether each sits on its grid's edge,
    and whether the method's tuning is settled (every run finished, no extension left). Unfinished rounds
    leave None."""
    tuned = [r for r in tuning_runs(runs) if r.seed in design.tuning_seeds and r.config["name"] in design.presets]

    def at(name: str, value, lr: float) -> dict[int, Run]:
        return {r.seed: r for r in tuned if family(r.config) == name and knob(r.config) == value
                and r.config["optim"]["lr"] == lr}

    out = {}
    for name, grid in ((ADAMW, None), (WARMUP, design.warmups), (SPECTRAL, design.taus)):
        if grid is None:
            values, value, settled = (None,), None, True
        else:
            values, value, settled = tuned_grid(grid, lambda v: at(name, v, design.tune_at), design.tuning_seeds,
                                                final_val, **bounds(design, name))
        lrs, lr = design.adamw_lrs if grid is None else design.lrs, None
        if settled and (value is not None or grid is None):
            lrs, lr, settled = tuned_grid(lrs, lambda rate: at(name, value, rate), design.tuning_seeds, final_val)
        else:
            settled = False
        out[name] = {"value": value, "values": list(values), "value_at_edge": at_edge(values, value), "lr": lr,
                     "lrs": list(lrs), "lr_at_edge": at_edge(lrs, lr), "settled": settled}
    return out


def compare_long(runs: list[Run], design: WarmupDesign, choice: dict[str, dict]) -> dict:
    """On the reported seeds, each method at its choice: its runs' losses and stability, and every method
    minus AdamW + warmup, seed by seed, with TOST at the registered margin."""
    reported = [r for r in reported_runs(runs) if r.config["name"] in design.presets]
    arms = {}
    for name, c in choice.items():
        by_seed = {r.seed: r for r in reported if family(r.config) == name and knob(r.config) == c["value"]
                   and r.config["optim"]["lr"] == c["lr"]}
        if losses := per_seed(by_seed, final_val):
            s = summarize(losses.values())
            arms[name] = {"value": c["value"], "lr": c["lr"], "seeds": list(losses), "val_loss": s["values"],
                          "mean": s["mean"], "std": s["std"], "stable_seeds": sum(map(stable, by_seed.values())),
                          "n": len(by_seed)}
    losses = {name: dict(zip(a["seeds"], a["val_loss"])) for name, a in arms.items()}
    pairs = {f"{name} − {WARMUP}": paired(losses[WARMUP], losses[name]).as_dict(design.margin)
             for name in (SPECTRAL, ADAMW) if name in losses and WARMUP in losses
             and losses[name].keys() & losses[WARMUP].keys()}
    return {"arms": arms, "paired": pairs, "missing": [name for name in choice if name not in arms]}


def edges_long(choice: dict[str, dict]) -> list[str]:
    """The choices on their grid's edge, in words: a better value may lie beyond them."""
    return [f"{name}: {what} {c[what]:g} on the edge of {c[what + 's']}" for name, c in choice.items()
            for what in ("value", "lr") if c[f"{what}_at_edge"]]


def tables_long(choice: dict[str, dict], compared: dict) -> str:
    def value(name: str, c: dict) -> str:
        if name == ADAMW:
            return "no warmup"
        label = "warmup" if name == WARMUP else "τ"
        return f"{label} {fmt(c['value'], 'g')} of {', '.join(f'{v:g}' for v in c['values'])}"

    tuning = markdown_table(["method", "chosen length or τ (at the registered rate)", "chosen rate", "on an edge",
                             "settled"],
                            [[name, value(name, c), f"{fmt(c['lr'], 'g')} of {', '.join(f'{v:g}' for v in c['lrs'])}",
                              "yes" if c["value_at_edge"] or c["lr_at_edge"] else "no", "yes" if c["settled"] else "no"]
                             for name, c in choice.items()])
    arms = markdown_table(["method", "lr", "final val loss per seed", "mean ± std", "stable seeds"],
                          [[name, f"{a['lr']:g}", ", ".join(f"{v:.4f}" for v in a["val_loss"]),
                            f"{a['mean']:.4f} ± {a['std']:.4f}", f"{a['stable_seeds']}/{a['n']}"]
                           for name, a in compared["arms"].items()], align="lrlrr")

    def tost(p: dict) -> str:
        e = p.get("equivalence")
        return f"[{e['interval90'][0]:+.4f}, {e['interval90'][1]:+.4f}], p = {e['p_value']:.3f}" if e else MISSING

    pairs = markdown_table(["comparison", "seeds", "mean", "95% interval", "TOST 90% interval (±margin)", "verdict"],
                           [[name, len(p["seeds"]), f"{p['mean']:+.4f}",
                             f"[{p['interval95'][0]:+.4f}, {p['interval95'][1]:+.4f}]" if p["interval95"] else MISSING,
                             tost(p), p["verdict"]] for name, p in compared["paired"].items()], align="lrrrrl")
    return f"{tuning}\n\n{arms}\n\n{pairs}"


def plot_long(runs: list[Run], design: WarmupDesign, choice: dict[str, dict], path) -> None:
    """Tuning: loss against length or τ and against rate (tuning seeds' mean); reported: training loss of each
    method at its choice, mean and min..max band over the seeds."""
    plt = pyplot()
    fig, (knobs, rates, curves) = plt.subplots(1, 3, figsize=(17, 4.5))
    tuned = [r for r in tuning_runs(runs) if r.config["name"] in design.presets]
    for name, c in choice.items():
        mine = [r for r in tuned if family(r.config) == name]
        for ax, rows in ((knobs, [r for r in mine if r.config["optim"]["lr"] == design.tune_at and name != ADAMW]),
                         (rates, [r for r in mine if knob(r.config) == c["value"]])):
            key = (lambda r: knob(r.config)) if ax is knobs else (lambda r: r.config["optim"]["lr"])
            points = {}
            for r in rows:
                if (v := final_val(r)) is not None:
                    points.setdefault(key(r), []).append(v)
            xs = sorted(points)
            if xs:
                ax.plot(xs, [sum(points[x]) / len(points[x]) for x in xs], marker="o", label=name)
    knobs.set(xscale="log", xlabel=f"warmup steps / τ (at lr {design.tune_at:g})", ylabel="final val loss (tuning)")
    rates.set(xscale="log", xlabel="peak learning rate (at the chosen length / τ)", ylabel="final val loss (tuning)")
    for name, c in choice.items():
        mine = [r for r in reported_runs(runs) if r.config["name"] in design.presets and family(r.config) == name
                and knob(r.config) == c["value"] and r.config["optim"]["lr"] == c["lr"]]
        if not mine:
            continue
        series = [r.series("loss") for r in mine]
        steps = sorted(set.intersection(*(set(x) for x in series)))
        values = [[x[t] for x in series] for t in steps]
        curves.plot(steps, [sum(v) / len(v) for v in values], lw=1, label=f"{name} (lr {c['lr']:g})")
        curves.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.2)
    curves.set(yscale="log", xlabel="step", ylabel="training loss (mean; band: min..max over seeds)",
               title="reported seeds, each method at its choice")
    for ax in (knobs, rates, curves):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_long(roots: list[Path], out: Path, name: str, design: WarmupDesign = WARMUP_LONG) -> dict:
    """The registered design's report: NAME.json and NAME.png into `out`, the tables printed."""
    runs = [r for r in load_runs(*roots, statuses=FINISHED) if r.config["name"] in design.presets]
    origin = results_provenance(runs)  # refused before any file is written
    choice = choose_long(runs, design)
    compared = compare_long(runs, design, choice)
    result = {**origin, "roots": [str(r) for r in roots], "design": design.name, "margin": design.margin,
              "choice": choice, "on_edge": edges_long(choice), **compared,
              "runs": [summarize_run(run) for run in runs]}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{name}.json", result)
    plot_long(runs, design, choice, out / f"{name}.png")
    print(tables_long(choice, compared))
    for line in result["on_edge"]:
        print(f"chosen on the grid's edge (a better value may lie beyond it): {line}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = report_parser(__doc__, name="warmup_free")
    parser.add_argument("--tune-at", type=float, default=1e-2, help="the rate at which warmup length and τ are chosen")
    parser.add_argument("--design", choices=("short", "long"), default="short",
                        help="short: the first runs (warmup_free.md); long: the design registered for issue 38")
    args = parser.parse_args(argv)
    if args.design == "long":
        return guarded(lambda: report_long(args.roots, args.out, args.name))
    return guarded(lambda: report(args.roots, args.out, args.name, args.tune_at))


if __name__ == "__main__":
    raise SystemExit(main())
