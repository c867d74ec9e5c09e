"""Trainer callbacks: metrics (JSON lines + TensorBoard), the progress bar and the loss plot.

The trainer calls every callback at fixed hook points; each one is independent of the others.
Only rank 0 writes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


class Callback:
    def on_train_start(self, trainer) -> None: ...
    def on_step_start(self, trainer) -> None: ...
    def on_before_update(self, trainer, loss: float) -> str | None:
        """Called after forward/backward, before the optimizer step: return "skip" or "stop" to act."""
    def on_step_end(self, trainer, metrics: dict) -> None: ...
    def on_eval(self, trainer, metrics: dict) -> None: ...
    def on_train_end(self, trainer) -> None: ...


class MetricsLogger(Callback):
    """One JSON object per logged step in `metrics.jsonl`; the same scalars in TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool, interval: int):
        self.path = run_dir / "metrics.jsonl"
        self.interval = interval
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def on_train_start(self, trainer) -> None:
        # after a crash and resume, drop the rows logged past the checkpoint: they are re-run
        if self.path.exists():
            rows = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= trainer.step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(r + "\n" for r in rows))
            tmp.replace(self.path)

    def _write(self, metrics: dict) -> None:
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.writer:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, metrics["step"])
            self.writer.flush()

    def on_step_end(self, trainer, metrics: dict) -> None:
        if metrics["step"] % self.interval == 0 or "val_loss" in metrics:
            self._write(metrics)

    def on_train_end(self, trainer) -> None:
        if self.writer:
            self.writer.close()


def write_json(path: Path, obj, **dumps_kwargs) -> None:
    """Write `obj` as JSON under a temporary name, then rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, **{"indent": 2, **dumps_kwargs}) + "\n")
    tmp.replace(path)


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl ([] if there is none); a line cut short by a killed run is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def completed_runs(*roots: Path) -> list[tuple[Path, dict, list[dict]]]:
    """(run folder, resolved config, metrics rows) of every run below `roots` (any depth) whose
    result.json says completed; runs still going or diverged are left out."""
    runs = []
    for info_path in sorted(p for root in roots for p in Path(root).rglob("run_info.json")):
        result = info_path.parent / "result.json"
        if result.exists() and json.loads(result.read_text())["status"] == "completed":
            runs.append((info_path.parent, json.loads(info_path.read_text())["config"], read_metrics(info_path.parent)))
    return runs


def pyplot():
    """matplotlib's pyplot on the Agg backend: keel's plots are PNG files, never a window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class ProgressBar(Callback):
    def __init__(self, max_steps: int):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
        self.max_steps = max_steps
        self.task = None

    def on_train_start(self, trainer) -> None:
        self.progress.start()
        self.task = self.progress.add_task("train", total=self.max_steps, completed=trainer.step, info="")

    def on_step_end(self, trainer, metrics: dict) -> None:
        info = f"loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  {metrics['tokens_per_s']:,.0f} tok/s"
        self.progress.update(self.task, completed=metrics["step"], info=info)

    def on_eval(self, trainer, metrics: dict) -> None:
        self.progress.console.print(f"step {metrics['step']}: val_loss {metrics['val_loss']:.4f}")

    def on_train_end(self, trainer) -> None:
        self.progress.stop()


class LossPlot(Callback):
    """`loss.png` in the run folder: training loss and validation loss against the step."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def on_train_end(self, trainer) -> None:
        plot_losses(self.run_dir, self.run_dir / "loss.png")


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
