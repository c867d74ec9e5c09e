"""`loss.png`: training and validation loss against the step, drawn when training ends."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pretrain.callbacks.base import Callback, Ranks, RunContext
from pretrain.rundir import pyplot, read_metrics


@dataclass
class LossPlotConfig:
    """The plot's key of `logging` (pretrain.config.LoggingConfig composes it)."""

    plot: bool = True


class LossPlot(Callback):
    """`loss.png` in the run folder: training loss and validation loss against the step (`logging.plot`)."""

    # before the metrics logger (METRICS_ORDER), whose trackers attach the plot when training ends; it
    # reads only metrics.jsonl, whose rows are written by then
    name, order, ranks = "loss_plot", 90, Ranks.main

    @classmethod
    def build(cls, run: RunContext) -> LossPlot | None:
        return cls(run.run_dir) if run.cfg.logging.plot else None

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def on_train_end(self, trainer) -> None:
        plot_losses(self.run_dir, self.run_dir / "loss.png")

    def summary(self, rows: list[dict]) -> dict[str, str]:
        return {"loss plot": str(self.run_dir / "loss.png")}


def plot_losses(run_dir: Path, out: Path) -> None:
    plt = pyplot()
    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), float)]
    val = [(r["step"], r["val_loss"]) for r in rows if isinstance(r.get("val_loss"), float)]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out)
