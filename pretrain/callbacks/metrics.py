"""Metrics: one JSON object per logged step in `metrics.jsonl`, and the same scalars in TensorBoard."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from models.config import ConfigError
from pretrain.callbacks.base import METRICS_ORDER, Callback, Ranks, RunContext
from pretrain.rundir import metrics_row


@dataclass
class MetricsConfig:
    """The logger's key of `logging` (pretrain.config.LoggingConfig composes it)."""

    tensorboard: bool = True  # the same scalars in TensorBoard (metrics.jsonl is always written)


class MetricsLogger(Callback):
    """Rank 0's metrics.jsonl and TensorBoard writer (`logging.tensorboard`)."""

    name, order, ranks = "metrics", METRICS_ORDER, Ranks.main

    @classmethod
    def build(cls, run: RunContext) -> MetricsLogger:
        return cls(run.run_dir, run.cfg.logging.tensorboard, run.cfg.trainer.log_interval)

    def __init__(self, run_dir: Path, tensorboard: bool, interval: int):
        self.path = run_dir / "metrics.jsonl"
        self.interval = interval
        self.writer, self.tensorboard = None, run_dir / "tensorboard"
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.tensorboard))

    def on_train_start(self, trainer) -> None:
        # after a crash and resume, drop the rows logged past the checkpoint (they are re-run), and a
        # last line a kill cut short (with a note: nothing else is ever dropped silently)
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
            if row["step"] <= trainer.step and trainer.step > 0:  # a start at step 0 re-runs its step-0 validation
                rows.append(line)
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

    def on_start_eval(self, trainer, metrics: dict) -> None:
        self._write(metrics)

    def on_step_end(self, trainer, metrics: dict) -> None:
        if metrics["step"] % self.interval == 0 or "val_loss" in metrics:
            self._write(metrics)

    def on_train_end(self, trainer) -> None:
        if self.writer:
            self.writer.close()

    def summary(self, rows: list[dict]) -> dict[str, str]:
        return {"metrics": str(self.path), **({"tensorboard": str(self.tensorboard)} if self.writer else {})}
