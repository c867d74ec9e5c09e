"""Plot one or more runs on shared axes: loss, validation loss, attention entropy, σ1(W_qᵀW_k), clip rate.

    python tools/plot.py RUN_DIR [RUN_DIR ...] [--out plot.png] [--labels a b ...]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from pretrain.rundir import pyplot, read_metrics

PANELS = [  # (title, metric key, log scale)
    ("training loss", "loss", False),
    ("validation loss", "val_loss", False),
    ("min attention entropy over layers (nats)", "stability/attn_entropy_min", False),
    ("max σ1(W_qᵀW_k) over layers", "stability/qk_sigma1_max", True),
    ("spectral-bound clip rate", "spectral/clip_rate", False),
    ("output-logit norm", "stability/logit_norm", True),
]


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r]
    # non-finite values are logged as strings; draw them as gaps
    pts = [(s, v if isinstance(v, (int, float)) else math.nan) for s, v in pts]
    return [s for s, _ in pts], [v for _, v in pts]


def plot_runs(run_dirs: list[Path], out: Path, labels: list[str] | None = None) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for i, run in enumerate(run_dirs):
        rows = read_metrics(run)
        label = labels[i] if labels else run.name
        for ax, (title, key, log) in zip(axes.flat, PANELS):
            x, y = series(rows, key)
            if x:
                ax.plot(x, y, "o-" if key == "val_loss" else "-", lw=1, ms=3, label=label, color=f"C{i}")
            ax.set_title(title, fontsize=10)
            ax.set_yscale("log" if log else "linear")
            ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("step")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("runs.png"))
    ap.add_argument("--labels", nargs="*")
    args = ap.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "metrics.jsonl").exists()]
    if missing:
        print(f"plot: error: no metrics.jsonl in {', '.join(missing)}; pass run folders", file=sys.stderr)
        return 2
    if args.labels and len(args.labels) != len(args.runs):
        print("plot: error: give one --labels entry per run folder", file=sys.stderr)
        return 2
    print(f"wrote {plot_runs(args.runs, args.out, args.labels)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
