"""Metrics: one JSON object per logged step in `metrics.jsonl`, and the same row in each tracker
(TensorBoard, Weights & Biases: trackers.py)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from models.config import ConfigError
from pretrain.callbacks.base import METRICS_ORDER, Callback, Ranks, RunContext
from pretrain.callbacks.trackers import Tracker, WandbConfig, build_trackers
from pretrain.rundir import metrics_row, write_text


@dataclass
class MetricsConfig:
    """The logger's key of `logging` (pretrain.config.LoggingConfig composes it)."""

    tensorboard: bool = True  # the same scalars in TensorBoard (metrics.jsonl is always written)
    wandb: WandbConfig = field(default_factory=WandbConfig)


class MetricsLogger(Callback):
    """Rank 0's metrics.jsonl, and the trackers `logging` turns on (TensorBoard, W&B)."""

    name, order, ranks = "metrics", METRICS_ORDER, Ranks.main

    @classmethod
    def build(cls, run: RunContext) -> MetricsLogger:
        return cls(run.run_dir, run.cfg.trainer.log_interval, build_trackers(run.cfg, run.run_dir))

    def __init__(self, run_dir: Path, interval: int, trackers: list[Tracker] = ()):
        self.run_dir, self.path = run_dir, run_dir / "metrics.jsonl"
        self.interval = interval
        self.trackers = list(trackers)

    def on_train_start(self, trainer) -> None:
        # after a crash and resume, drop the rows logged past the checkpoint (they are re-run), and a
        # last line a kill cut short (with a note: nothing else is ever dropped silently)
        self._keep_rows(trainer.step)

    def on_rewind(self, trainer, event: dict) -> None:
        # the rows past the checkpoint are re-run (the event row says what was dropped), and a copy of
        # this event logged before a kill mid-rewind is not doubled
        self._keep_rows(event["step"], drop=lambda row: row.get("rewind") == event["rewind"])
        self._write(event, track=False)  # an event, not a step's scalars

    def _keep_rows(self, step: int, drop=lambda row: False) -> None:
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
        rows = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            row = metrics_row(line)
            if row is None:
                if i < last:
                    raise ConfigError(f"{self.path} line {i + 1} is not a metrics row (a JSON object with an integer "
                                     "step); repair or remove that line to resume")
                print(f"keel: dropped the last line of {self.path}, cut short when the run stopped", flush=True)
                continue
            if row["step"] <= step and step > 0 and not drop(row):  # a start at step 0 re-runs its validation
                rows.append(line)
        write_text(self.path, "".join(r + "\n" for r in rows))

    def _write(self, metrics: dict, track: bool = True) -> None:
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        row = {k: v for k, v in metrics.items() if k != "step"}
        for tracker in self.trackers if track else ():
            tracker.log(row, metrics["step"])

    def on_start_eval(self, trainer, metrics: dict) -> None:
        self._write(metrics)

    def on_step_end(self, trainer, metrics: dict) -> None:
        if metrics["step"] % self.interval == 0 or "val_loss" in metrics or "skipped_steps" in metrics:
            self._write(metrics)

    def on_train_end(self, trainer) -> None:
        # the loss plot (pretrain/callbacks/loss_plot.py) is drawn by now: it runs first
        plot = self.run_dir / "loss.png"
        for tracker in self.trackers:
            tracker.finish({"loss_plot": plot} if plot.is_file() else {})

    def summary(self, rows: list[dict]) -> dict[str, str]:
        return {"metrics": str(self.path), **{k: v for t in self.trackers for k, v in t.summary().items()}}
