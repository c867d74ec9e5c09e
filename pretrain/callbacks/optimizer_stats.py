"""The optimizer's update-rule statistics in the logged metrics."""

from __future__ import annotations

from pretrain.callbacks.base import Callback


class OptimizerStats(Callback):
    """`KeelOptimizer.pop_stats` on logged steps: how often and how hard the spectral bound clipped per
    matrix group, or the spread of QuacK's rate factors."""

    def __init__(self, optimizer, interval: int):
        self.optimizer, self.interval = optimizer, interval

    def on_step_end(self, trainer, metrics: dict) -> None:
        if metrics["step"] % self.interval == 0:
            metrics.update(self.optimizer.pop_stats())
