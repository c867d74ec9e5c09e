"""Loss-spike handling: the section `logging.monitors.spike` (the policy and its thresholds), the host-side
detector that logs spikes (a one-sided z-score against a rolling window of recent non-spike losses),
and the callback that feeds it every step's record.

The decision that acts on the update is made on the device (`optim.skip_step`), by the same rule on
the loss and also on the gradient norm; `SpikeDetector` is its reference and the logging path. The
rewind that persistent spikes trigger is `pretrain.recovery`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from models.config import check, check_choices, check_positive, choice, choices
from optim.skip_step import SkipRule
from pretrain.callbacks.base import Callback, RunContext

SpikeAction = choices("SpikeAction", "log", "skip", "stop")  # what the host detector reports
SpikePolicy = choices("SpikePolicy", "log", "skip", "rewind", "stop")  # what a run does about spikes
SPIKE_MIN_HISTORY = 20  # losses a spike detector needs before it judges one (the default min_count)
# the keys `logging.monitors.spike` replaced, and where each went
MIGRATED_KEYS = {"spike_window": "spike.window", "spike_z": "spike.loss_z", "spike_action": "spike.action"}


@dataclass
class RewindConfig:
    """`logging.monitors.spike.rewind`: when persistent spikes rewind the run, and how far."""

    skips: int = 3  # this many dropped steps ...
    within: int = 50  # ... within this many steps rewind (so does a non-finite loss)
    margin: int = 20  # the data position moves this many steps' rows past the last spike
    lr_factor: float = 1.0  # the learning rate times this ...
    lr_steps: int = 0  # ... for this many steps after a rewind
    max_rewinds: int = 3  # one more ends the run with one line

    def __post_init__(self):
        check_positive("logging.monitors.spike.rewind", self, "skips", "within", "max_rewinds")
        for key in ("margin", "lr_steps"):
            value = getattr(self, key)
            check(value >= 0, f"logging.monitors.spike.rewind.{key} must be >= 0, got {value}")
        check(0 < self.lr_factor <= 1,
              f"logging.monitors.spike.rewind.lr_factor must be in (0, 1], got {self.lr_factor}")
        check(self.skips <= self.within, f"logging.monitors.spike.rewind.skips={self.skips} must be <= "
              f"rewind.within={self.within}: that many dropped steps cannot fit in the window")


@dataclass
class SpikeConfig:
    """`logging.monitors.spike`: log spikes only, skip (drop) their updates on the device, rewind past the
    data that caused a persistent one, or stop. A non-finite loss or gradient is always dropped."""

    action: str = choice(SpikePolicy, "log")
    window: int = 128  # recent accepted steps the statistics cover (OLMo-core's 128)
    loss_z: float = 6.0  # a loss this many standard deviations above the window's mean is a spike
    grad_norm_z: float = 6.0  # the same for the gradient norm (inf: the loss alone decides)
    min_count: int = SPIKE_MIN_HISTORY  # values a window needs before it judges
    rewind: RewindConfig = field(default_factory=RewindConfig)

    def __post_init__(self):
        check_choices("logging.monitors.spike", self)
        check_positive("logging.monitors.spike", self, "loss_z", "grad_norm_z")
        check(2 <= self.min_count <= self.window, f"logging.monitors.spike: need 2 <= min_count <= window, got "
              f"min_count={self.min_count}, window={self.window}")

    def skip_rule(self) -> SkipRule:
        """The device-side rule: it drops updates under skip, rewind and stop; under log only non-finite ones."""
        return SkipRule(self.window, self.loss_z, self.grad_norm_z, self.min_count, enabled=self.action != "log")


@dataclass
class SpikeMonitorConfig:
    """The spike section's place in `logging.monitors` (pretrain.config.MonitorConfig composes it)."""

    spike: SpikeConfig = field(default_factory=SpikeConfig)


@dataclass(frozen=True)
class SpikeEvent:
    step: int
    loss: float
    mean: float  # window mean the loss was judged against (nan before min_history)
    std: float
    z: float  # (loss - mean) / std; inf for a non-finite loss
    reason: Literal["zscore", "nonfinite"]
    action: SpikeAction
    consecutive: int  # spikes in a row including this one


class SpikeDetector:
    """z = (loss - mean) / max(std, min_std) over the last `window` accepted losses; a spike when
    z > z_threshold (only upward jumps matter) once `min_history` losses are in the window, or
    whenever the loss is NaN/inf.  `reset_after` consecutive spikes (None: never) clear the history,
    accepting a genuine level shift instead of flagging every later step."""

    def __init__(
        self,
        window: int = 100,
        z_threshold: float = 6.0,
        min_history: int = SPIKE_MIN_HISTORY,
        action: SpikeAction = SpikeAction.log,
        min_std: float = 1e-6,
        reset_after: int | None = None,
    ) -> None:
        if action not in tuple(SpikeAction):
            raise ValueError(f"action must be log, skip or stop, not {action!r}")
        if not 2 <= min_history <= window:
            raise ValueError("need 2 <= min_history <= window")
        self.window, self.z_threshold, self.min_history = window, z_threshold, min_history
        self.action = SpikeAction(action)
        self.min_std, self.reset_after = min_std, reset_after
        self.history: deque[float] = deque(maxlen=window)
        self.consecutive = 0
        self.num_spikes = 0

    def _moments(self) -> tuple[float, float]:
        """Population mean/std of the window (two-pass, so exact resume reproduces it bit for bit)."""
        n = len(self.history)
        if n == 0:
            return math.nan, math.nan
        mean = sum(self.history) / n
        return mean, math.sqrt(sum((x - mean) ** 2 for x in self.history) / n)

    def observe(self, step: int, loss: float) -> SpikeEvent | None:
        loss = float(loss)
        mean, std = self._moments()
        # 1. classify: a non-finite loss is always a spike; otherwise only with enough history
        if not math.isfinite(loss):
            reason, z = "nonfinite", math.inf
        elif len(self.history) >= self.min_history:
            z = (loss - mean) / max(std, self.min_std)
            reason = "zscore" if z > self.z_threshold else None
        else:
            reason = None
        # 2. an accepted loss joins the window; a spike does not
        if reason is None:
            self.history.append(loss)
            self.consecutive = 0
            return None
        self.consecutive += 1
        self.num_spikes += 1
        event = SpikeEvent(step, loss, mean, std, z, reason, self.action, self.consecutive)
        # 3. persistent "spikes" are a new level: restart the window from scratch
        if self.reset_after is not None and self.consecutive >= self.reset_after:
            self.history.clear()
            self.consecutive = 0
        return event

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "consecutive": self.consecutive,
                "num_spikes": self.num_spikes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = deque((float(x) for x in state["history"]), maxlen=self.window)
        self.consecutive = int(state["consecutive"])
        self.num_spikes = int(state["num_spikes"])


class SpikeMonitor(Callback):
    """Logs loss spikes by the host detector, from each step's record as the trainer reads it (a step late,
    or at once on a logged step): the same rule the device applies, as a reference and for metrics."""

    name, order = "spike", 10  # every rank: the trainer's records are the same on every rank

    @classmethod
    def build(cls, run: RunContext) -> SpikeMonitor:
        return cls(run.cfg.logging.monitors.spike)

    def __init__(self, cfg: SpikeConfig):
        action = "log" if cfg.action == "rewind" else cfg.action
        self.detector = SpikeDetector(window=cfg.window, z_threshold=cfg.loss_z, min_history=cfg.min_count,
                                      action=action)
        self.events: list[SpikeEvent] = []

    def on_step_record(self, trainer, step: int, record: dict) -> None:
        event = self.detector.observe(step, record["loss"])
        if event is not None:
            self.events.append(event)

    def on_step_end(self, trainer, metrics: dict) -> None:
        if self.events:
            metrics.update({"spike": len(self.events), "spike_steps": " ".join(str(e.step) for e in self.events),
                            "spike_z": max(e.z for e in self.events)})
            self.events = []

    def on_rewind(self, trainer, event: dict) -> None:
        self.events = []  # spikes of the steps the rewind discarded (its event row names them)

    def state_dict(self) -> dict:
        return self.detector.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.detector.load_state_dict(state)

    def summary(self, rows: list[dict]) -> dict[str, str]:
        # a row names its spikes (read a step late, they may be the previous step's); older rows only flag theirs
        spikes = [s for r in rows if r.get("spike") for s in str(r.get("spike_steps", r["step"])).split()]
        lines = {"loss spikes": f"flagged at steps {', '.join(map(str, spikes[:8]))}" if spikes else "none flagged"}
        dropped = max((r.get("skipped_total", 0) for r in rows), default=0)
        if dropped:
            lines["dropped updates"] = str(dropped)
        rewinds = [r for r in rows if r.get("event") == "rewind"]
        if rewinds:
            lines["rewinds"] = "; ".join(f"at step {r['at_step']} to {r['to_step']} ({r['reason']}), "
                                         f"{r['data_rows_skipped']} data rows skipped" for r in rewinds)
        return lines
