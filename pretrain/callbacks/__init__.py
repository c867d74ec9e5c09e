"""The trainer's callbacks, one file each, held by name (see `base.Callback` for the hooks).

`build_callbacks` decides which run and in what order: the monitors add their metrics before the
metrics logger writes the row, and only rank 0 writes files.
"""

from __future__ import annotations

from pathlib import Path

from pretrain.callbacks.base import Callback

__all__ = ["Callback", "build_callbacks"]


def build_callbacks(cfg, world, run_dir: Path, gpt, optimizer) -> dict[str, Callback]:
    """The callbacks of a run, by name, in call order."""
    from pretrain.callbacks.spike import SpikeMonitor

    mon = cfg.logging.monitors
    callbacks: dict[str, Callback] = {"spike": SpikeMonitor(mon)}  # every rank: it acts on the update
    if mon.interval > 0:
        from pretrain.callbacks.stability import StabilityMonitor

        callbacks["stability"] = StabilityMonitor(gpt, mon)  # every rank: it uses collectives
    if cfg.optim.spectral.enabled or cfg.optim.quack:
        from pretrain.callbacks.optimizer_stats import OptimizerStats

        callbacks["optimizer"] = OptimizerStats(optimizer, cfg.trainer.log_interval)
    if cfg.model.moe.num_experts:
        from pretrain.callbacks.moe import MoEStatsCallback

        callbacks["moe"] = MoEStatsCallback(cfg.trainer.log_interval)  # every rank: all-reduces over DP
    if world.is_main:
        from pretrain.callbacks.loss_plot import LossPlot
        from pretrain.callbacks.metrics import MetricsLogger
        from pretrain.callbacks.progress import ProgressBar

        callbacks["metrics"] = MetricsLogger(run_dir, cfg.logging.tensorboard, cfg.trainer.log_interval)
        if cfg.trainer.progress:
            callbacks["progress"] = ProgressBar(cfg.trainer.max_steps)
        if cfg.logging.plot:
            callbacks["loss_plot"] = LossPlot(run_dir)
    return callbacks
