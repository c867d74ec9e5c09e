"""The optimizer's update-rule statistics in the logged metrics."""

from __future__ import annotations

from pretrain.callbacks.base import Callback, RunContext


class OptimizerStats(Callback):
    """`KeelOptimizer.pop_stats` on logged steps: how often and how hard the spectral bound clipped per
    matrix group, or the spread of QuacK's rate factors."""

    name, order = "optimizer", 30

    @classmethod
    def build(cls, run: RunContext) -> OptimizerStats | None:
        optim = run.cfg.optim
        return cls(run.optimizer, run.cfg.trainer.log_interval) if optim.spectral.enabled or optim.quack else None

    def __init__(self, optimizer, interval: int):
        self.optimizer, self.interval = optimizer, interval

    def on_step_end(self, trainer, metrics: dict) -> None:
        if metrics["step"] % self.interval == 0:
            metrics.update(self.optimizer.pop_stats())
