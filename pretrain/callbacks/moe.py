"""MoE router statistics in the trainer's metrics: `moe/...` keys on logged steps, and routing by source
at each evaluation."""

from __future__ import annotations

from megatron.core import parallel_state

from pretrain.callbacks.base import Callback, RunContext

NAMED_SET = "val_loss/"  # the metric prefix of data.val_sets: each named validation set is one source


class MoEStatsCallback(Callback):
    """Adds the statistics of `models.moe.stats.collect` to `metrics` before the logger writes them, and
    at each evaluation the routing-by-source metrics of `models.moe.stats.source_routing_metrics`.

    Runs on every rank: the sums are all-reduced over the ranks that route different tokens on logged
    steps (the same steps everywhere): the data-parallel group, and with sequence parallelism (each TP
    rank routes its share of the sequence) the tensor- and data-parallel group. Every step starts from
    zero so a row describes exactly its step.
    Sources are the named validation sets (data.val_sets), each scored on its own (`on_eval_set`), so
    the counts say which experts each source's tokens went to; the main set (val_loss) may mix sources
    and is not one. With fewer than two named sets nothing is logged.
    """

    name, order = "moe", 40  # every rank: it all-reduces over DP (and TP)

    @classmethod
    def build(cls, run: RunContext) -> MoEStatsCallback | None:
        return cls(run.cfg.trainer.log_interval) if run.cfg.model.moe.num_experts else None

    def __init__(self, interval: int):
        self.interval = interval
        self.source_loads: dict = {}  # source -> layer -> routed assignments per expert, this evaluation

    def on_train_start(self, trainer) -> None:
        from models.moe import reset

        reset(trainer.model)  # nothing from a forward before training (or before a resume) counts

    def on_eval_set(self, trainer, key: str) -> None:
        from models.moe import take_eval_loads

        # every set is taken (and its counts restarted), so no set's tokens leak into the next one's
        loads = take_eval_loads(trainer.model, token_group(trainer.model))
        if key.startswith(NAMED_SET):
            self.source_loads[key.removeprefix(NAMED_SET)] = loads

    def on_start_eval(self, trainer, metrics: dict) -> None:
        from models.moe import reset, source_routing_metrics

        metrics.update(source_routing_metrics(self.source_loads))  # routing by source of the starting model
        self.source_loads = {}
        reset(trainer.model)

    def on_step_end(self, trainer, metrics: dict) -> None:
        from models.moe import collect, reset, source_routing_metrics

        if metrics["step"] % self.interval == 0 or "val_loss" in metrics:
            metrics.update(collect(trainer.model, token_group(trainer.model)))
        if "val_loss" in metrics:
            metrics.update(source_routing_metrics(self.source_loads))
        self.source_loads = {}
        reset(trainer.model)


def token_group(model):
    """The ranks whose routers see different tokens: data-parallel, and tensor-parallel too when the
    sequence is split over TP (sequence parallelism)."""
    if model.config.sequence_parallel:
        return parallel_state.get_tensor_and_data_parallel_group()
    return parallel_state.get_data_parallel_group()
