"""MoE router statistics in the trainer's metrics: `moe/...` keys on logged steps."""

from __future__ import annotations

from megatron.core import parallel_state

from pretrain.callbacks.base import Callback


class MoEStatsCallback(Callback):
    """Adds the statistics of `models.moe.stats.collect` to `metrics` before the logger writes them.

    Runs on every rank: the sums are all-reduced over the data-parallel group on logged steps (the
    same steps everywhere), and every step starts from zero so a row describes exactly its step.
    """

    def __init__(self, interval: int):
        self.interval = interval

    def on_train_start(self, trainer) -> None:
        from models.moe import reset

        reset(trainer.gpt)  # nothing from a forward before training (or before a resume) counts

    def on_step_end(self, trainer, metrics: dict) -> None:
        from models.moe import collect, reset

        if metrics["step"] % self.interval == 0 or "val_loss" in metrics:
            metrics.update(collect(trainer.gpt, parallel_state.get_data_parallel_group()))
        reset(trainer.gpt)
