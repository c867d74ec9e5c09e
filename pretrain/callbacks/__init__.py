"""The trainer's callbacks and the registry that lists them.

Each callback owns itself in one module (`base.Callback` says what one declares): its name (its
checkpoint key), its call order, the ranks it runs on, its config and how the run's config turns it
on (`build`), its hooks and state, and its lines in the run summary. Adding one is that module and one
line below (or `register` from outside keel, in a module named in KEEL_PLUGINS).
"""

from __future__ import annotations

from models.config import check
from pretrain.callbacks.base import METRICS_ORDER, Callback, Ranks, RunContext
from pretrain.callbacks.downstream import DownstreamEval
from pretrain.callbacks.loss_plot import LossPlot
from pretrain.callbacks.metrics import MetricsLogger
from pretrain.callbacks.moe import MoEStatsCallback
from pretrain.callbacks.optimizer_stats import OptimizerStats
from pretrain.callbacks.profile import StepProfiler
from pretrain.callbacks.progress import ProgressBar
from pretrain.callbacks.spike import SpikeMonitor
from pretrain.callbacks.stability import StabilityMonitor

__all__ = ["CALLBACKS", "METRICS_ORDER", "Callback", "Ranks", "RunContext", "build_callbacks", "register"]

KEEL_CALLBACKS = (StepProfiler, SpikeMonitor, StabilityMonitor, OptimizerStats, MoEStatsCallback, DownstreamEval,
                  MetricsLogger, ProgressBar, LossPlot)
CALLBACKS: dict[str, type[Callback]] = {}  # every registered callback by name: keel's, then any added


def register(cls: type[Callback]) -> type[Callback]:
    """Add a callback (keel's below; a test or a user's package may add its own before a run is built)."""
    check(bool(cls.name) and CALLBACKS.get(cls.name, cls) is cls,
          f"callback {cls.name!r} is registered already (or has no name): pick another name")
    check(cls.ranks in tuple(Ranks), f"callback {cls.name}: ranks={cls.ranks!r}; choose one of {', '.join(Ranks)}")
    CALLBACKS[cls.name] = cls
    return cls


for _cls in KEEL_CALLBACKS:
    register(_cls)


def build_callbacks(run: RunContext) -> dict[str, Callback]:
    """The run's callbacks by name, in call order (`order`, then name): every registered one that runs
    on this rank and that the run's config turns on."""
    callbacks = {}
    for cls in sorted(CALLBACKS.values(), key=lambda c: (c.order, c.name)):
        if cls.ranks == Ranks.main and not run.world.is_main:
            continue
        callback = cls.build(run)
        if callback is not None:
            callbacks[cls.name] = callback
    return callbacks
