"""Aggregate the MoE specialization experiment (docs/results/moe.md): a markdown table and plots.

    python tools/experiments/moe_report.py runs/moe_spec --out docs/results

The runs, three Hydra multiruns into runs/moe_spec (the presets set hydra.sweep.dir and name each
folder by preset and overrides; add hydra/launcher=local hydra.launcher.n_jobs=N to run N at once):

    python pretrain/main.py -m +experiment=moe_specialization seed=1,2,3 trainer.max_steps=200
    python pretrain/main.py -m +experiment=moe_specialization model.moe.ortho_loss=10,1,0.1 \
        model.moe.var_loss=0.1 seed=1,2,3 trainer.max_steps=200
    python pretrain/main.py -m +experiment=moe_dense_baseline seed=1,2,3 trainer.max_steps=200

Each completed run folder (any depth below the roots) is assigned to an arm by its config: dense (no
experts), aux only, or aux plus the specialization terms that are on. Router statistics are averaged
over the last `--tail` fraction of logged steps (single steps are noisy); validation loss is the final
evaluation. Writes moe_summary.json, moe_specialization_curves.png and moe_load_heatmap.png into --out.
"""

from __future__ import annotations

import statistics

from pretrain.rundir import pyplot, runs_provenance, write_json
from tools.experiments.common import (Run, by_arm, fmt, guarded, load_runs, markdown_table, mean_std, per_seed,
                                      report_parser, summarize)

STATS = ("overlap", "routing_var", "maxvio", "entropy", "weight_sim", "dropped")
DENSE = "dense"


def arm_of(run: Run) -> str:
    moe = run.config["model"]["moe"]
    if not moe["num_experts"]:
        return DENSE
    terms = [f"ortho (beta={moe['ortho_loss']:g})"] * bool(moe["ortho_loss"]) + \
            [f"var (gamma={moe['var_loss']:g})"] * bool(moe["var_loss"])
    return " + ".join(["aux"] + terms) if terms else "aux only"


def tail_mean(run: Run, key: str, tail: float) -> float | None:
    """Mean of the last `tail` fraction (at least one) of the logged values of `key`."""
    values = run.values(key)
    if not values:
        return None
    n = max(1, int(len(values) * tail))
    return statistics.fmean(values[-n:])


def summarize_arms(arms: dict[str, dict[int, Run]], tail: float) -> dict[str, dict[str, tuple[float, float, int]]]:
    """arm -> metric -> (mean, std over seeds, seeds), for the final val_loss and each router statistic."""
    metrics = {"val_loss": lambda run: run.last("val_loss")}
    metrics |= {s: (lambda run, key=f"moe/{s}": tail_mean(run, key, tail)) for s in STATS}
    out = {}
    for arm, runs in arms.items():
        out[arm] = {}
        for metric, value in metrics.items():
            if seeds := per_seed(runs, value):
                s = summarize(seeds.values())
                out[arm][metric] = (s["mean"], s["std"], s["n"])
    return out


def table(summary: dict) -> str:
    cols = ("val_loss",) + STATS
    rows = [[arm, max((v[2] for v in m.values()), default=0),
             *(mean_std(*m[c][:2]) if c in m else fmt(None) for c in cols)]
            for arm, m in summary.items()]
    return markdown_table(["arm", "seeds", *cols], rows)


def plot_curves(arms: dict[str, dict[int, Run]], keys: tuple[str, ...], out) -> None:
    """Mean over seeds of `moe/<key>` against the step, one panel per key, one line per MoE arm."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6))
    for ax, key in zip(axes, keys):
        for arm, runs in arms.items():
            series = [run.series(f"moe/{key}") for run in runs.values()]
            steps = sorted(set.intersection(*(set(s) for s in series))) if series and series[0] else []
            if steps:
                ax.plot(steps, [statistics.mean(s[t] for s in series) for t in steps], label=arm, lw=1.2)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_load_heatmaps(arms: dict[str, dict[int, Run]], tail: float, out) -> None:
    """Per MoE arm: layers x experts ranked by load, the share of routed tokens over the last `tail` of
    training. Expert indices mean nothing across seeds (which expert learns what is arbitrary), so each
    seed's experts are sorted by load within each layer first, and seeds are averaged rank by rank."""
    plt = pyplot()
    grids = {}
    for arm, by_seed in arms.items():
        runs = list(by_seed.values())
        experts = runs[0].config["model"]["moe"]["num_experts"]
        layers = sorted({int(k.split("/")[1][5:]) for k in runs[0].rows[-1] if k.startswith("moe/layer")})

        def ranked(run: Run, layer: int) -> list[float]:
            return sorted((tail_mean(run, f"moe/layer{layer}/load/{e}", tail) for e in range(experts)), reverse=True)

        grids[arm] = (layers, experts, [[statistics.mean(col) for col in zip(*(ranked(run, l) for run in runs))]
                                        for l in layers])
    vmax = max(max(max(row) for row in g[2]) for g in grids.values())  # one colour scale for all arms
    fig, axes = plt.subplots(1, len(grids), figsize=(5.5 * len(grids), 2.8), squeeze=False)
    for ax, (arm, (layers, experts, grid)) in zip(axes[0], grids.items()):
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_yticks(range(len(layers)), [f"layer {l}" for l in layers])
        ax.set_xticks(range(experts))
        ax.set_xlabel("expert, ranked by load within each seed (busiest first)")
        ax.set_title(arm, fontsize=8)
        fig.colorbar(im, ax=ax, label="share of routed tokens")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = report_parser(__doc__)
    p.add_argument("--tail", type=float, default=0.2, help="fraction of logged steps averaged for statistics")
    args = p.parse_args(argv)

    def report() -> None:
        runs = load_runs(*args.roots)
        arms = by_arm(runs, arm_of)
        summary = summarize_arms(arms, args.tail)
        args.out.mkdir(parents=True, exist_ok=True)
        moe_arms = {a: r for a, r in arms.items() if a != DENSE}
        if moe_arms:
            plot_curves(moe_arms, ("overlap", "routing_var", "maxvio", "entropy"),
                        args.out / "moe_specialization_curves.png")
            plot_load_heatmaps(moe_arms, args.tail, args.out / "moe_load_heatmap.png")
        print(table(summary))
        write_json(args.out / "moe_summary.json", {"provenance": runs_provenance([r.info for r in runs]), "arms": summary})

    return guarded(report)


if __name__ == "__main__":
    raise SystemExit(main())
