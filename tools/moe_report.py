"""Aggregate the MoE specialization experiment: a markdown table and plots from run folders.

    python tools/moe_report.py runs/moe_spec --out docs/results

Each completed run folder (any depth below ROOT) is assigned to an arm by its config: dense (no
experts), aux only, or aux plus the specialization terms that are on. Router statistics are averaged over the last `--tail` fraction of logged steps (single steps are noisy);
validation loss is the final evaluation.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python tools/moe_report.py`

from pretrain.callbacks import completed_runs, pyplot, write_json  # noqa: E402

STATS = ("overlap", "routing_var", "maxvio", "entropy", "weight_sim", "dropped")


def arm_of(config: dict) -> str:
    moe = config["model"]["moe"]
    if not moe["num_experts"]:
        return "dense"
    terms = [f"ortho (beta={moe['ortho_loss']:g})"] * bool(moe["ortho_loss"]) + \
            [f"var (gamma={moe['var_loss']:g})"] * bool(moe["var_loss"])
    return " + ".join(["aux"] + terms) if terms else "aux only"


def load_runs(root: Path) -> dict[str, list[dict]]:
    """arm -> runs, each {"seed", "rows", "config"}."""
    arms: dict[str, list[dict]] = defaultdict(list)
    for _, config, rows in completed_runs(root):
        arms[arm_of(config)].append({"seed": config["seed"], "rows": rows, "config": config})
    return dict(arms)


def tail_mean(rows: list[dict], key: str, tail: float) -> float | None:
    values = [r[key] for r in rows if isinstance(r.get(key), float)]
    if not values:
        return None
    n = max(1, int(len(values) * tail))
    return sum(values[-n:]) / n


def final_val(rows: list[dict]) -> float | None:
    vals = [r["val_loss"] for r in rows if isinstance(r.get("val_loss"), float)]
    return vals[-1] if vals else None


def summarize(arms: dict[str, list[dict]], tail: float) -> dict[str, dict[str, tuple[float, float, int]]]:
    """arm -> metric -> (mean, std over seeds, seeds)."""
    out = {}
    for arm, runs in arms.items():
        per_metric: dict[str, list[float]] = defaultdict(list)
        for run in runs:
            v = final_val(run["rows"])
            if v is not None:
                per_metric["val_loss"].append(v)
            for s in STATS:
                x = tail_mean(run["rows"], f"moe/{s}", tail)
                if x is not None:
                    per_metric[s].append(x)
        out[arm] = {m: (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0, len(xs))
                    for m, xs in per_metric.items()}
    return out


def markdown_table(summary: dict) -> str:
    cols = ("val_loss",) + STATS
    lines = ["| arm | seeds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for arm, m in summary.items():
        seeds = max((v[2] for v in m.values()), default=0)
        cells = [f"{m[c][0]:.4f} ± {m[c][1]:.4f}" if c in m else "—" for c in cols]
        lines.append(f"| {arm} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(arms: dict, keys: tuple[str, ...], out: Path) -> None:
    """Mean over seeds of `moe/<key>` against the step, one panel per key, one line per MoE arm."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6))
    for ax, key in zip(axes, keys):
        for arm, runs in arms.items():
            series = [{r["step"]: r[f"moe/{key}"] for r in run["rows"] if f"moe/{key}" in r} for run in runs]
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


def plot_load_heatmaps(arms: dict, tail: float, out: Path) -> None:
    """Per arm: layers x experts, the share of routed tokens over the last `tail` of training."""
    plt = pyplot()
    moe_arms = {a: r for a, r in arms.items() if a != "dense"}
    grids = {}
    for arm, runs in moe_arms.items():
        experts = runs[0]["config"]["model"]["moe"]["num_experts"]
        layers = sorted({int(k.split("/")[1][5:]) for k in runs[0]["rows"][-1] if k.startswith("moe/layer")})
        grids[arm] = (layers, experts, [[statistics.mean(tail_mean(run["rows"], f"moe/layer{l}/load/{e}", tail)
                                                         for run in runs) for e in range(experts)] for l in layers])
    vmax = max(max(max(row) for row in g[2]) for g in grids.values())  # one colour scale for all arms
    fig, axes = plt.subplots(1, len(moe_arms), figsize=(5.5 * len(moe_arms), 2.8), squeeze=False)
    for ax, (arm, (layers, experts, grid)) in zip(axes[0], grids.items()):
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_yticks(range(len(layers)), [f"layer {l}" for l in layers])
        ax.set_xticks(range(experts))
        ax.set_xlabel("expert")
        ax.set_title(arm, fontsize=8)
        fig.colorbar(im, ax=ax, label="share of routed tokens")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path)
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    p.add_argument("--tail", type=float, default=0.2, help="fraction of logged steps averaged for statistics")
    args = p.parse_args()
    arms = load_runs(args.root)
    summary = summarize(arms, args.tail)
    args.out.mkdir(parents=True, exist_ok=True)
    moe_arms = {a: r for a, r in arms.items() if a != "dense"}
    plot_curves(moe_arms, ("overlap", "routing_var", "maxvio", "entropy"), args.out / "moe_specialization_curves.png")
    plot_load_heatmaps(arms, args.tail, args.out / "moe_load_heatmap.png")
    print(markdown_table(summary))
    write_json(args.out / "moe_summary.json", summary)


if __name__ == "__main__":
    main()
