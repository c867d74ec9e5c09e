"""Loss-spike detection by a one-sided z-score against a rolling window of recent non-spike losses,
and the callback that applies it to every step's loss (its keys: `logging.monitors.spike_*`).

`SpikeDetector.observe(step, loss)` runs once per step and returns an event whose `action` is
"log" (record only), "skip" (drop this update) or "stop" (end the run).  Spikes are kept out of the
history so a burst of bad steps cannot raise the baseline it is judged against.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

from models.config import check, check_choices, check_positive, choice, choices
from pretrain.callbacks.base import Callback, RunContext

SpikeAction = choices("SpikeAction", "log", "skip", "stop")
SPIKE_MIN_HISTORY = 20  # losses a spike detector needs before it judges one


@dataclass
class SpikeConfig:
    """The spike detector's keys of `logging.monitors` (pretrain.config.MonitorConfig composes them)."""

    spike_window: int = 50
    spike_z: float = 6.0
    spike_action: str = choice(SpikeAction, "log")

    def __post_init__(self):
        check_choices("logging.monitors", self)
        check_positive("logging.monitors", self, "spike_z")
        check(self.spike_window >= SPIKE_MIN_HISTORY,
              f"logging.monitors.spike_window must be >= {SPIKE_MIN_HISTORY}, got {self.spike_window}")


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
    """Loss spikes by z-score over a window; the action is log, skip the update, or stop."""

    name, order = "spike", 10  # every rank: it acts on the update

    @classmethod
    def build(cls, run: RunContext) -> SpikeMonitor:
        return cls(run.cfg.logging.monitors)

    def __init__(self, cfg: SpikeConfig):
        self.detector = SpikeDetector(window=cfg.spike_window, z_threshold=cfg.spike_z, action=cfg.spike_action)
        self.event = None

    def on_before_update(self, trainer, loss: float):
        self.event = self.detector.observe(trainer.step + 1, loss)
        return self.event.action if self.event and self.event.action != "log" else None

    def on_step_end(self, trainer, metrics: dict) -> None:
        if self.event is not None:
            metrics.update({"spike": 1, "spike_z": self.event.z, "spike_action": self.event.action})
            self.event = None

    def state_dict(self) -> dict:
        return self.detector.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.detector.load_state_dict(state)

    def summary(self, rows: list[dict]) -> dict[str, str]:
        spikes = [r["step"] for r in rows if r.get("spike")]
        return {"loss spikes": f"flagged at steps {', '.join(map(str, spikes[:8]))}" if spikes else "none flagged"}
