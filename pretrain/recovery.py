"""What the host does with each step's record (`optim.skip_step.RECORD`) once it reads it, a step late:
counting dropped steps, and deciding when persistent spikes rewind the run (`logging.monitors.spike`).

A rewind reloads the newest verified checkpoint from before the first spike of the burst, moves the
data position past the rows that led to it (to `margin` steps past the last spike), optionally lowers
the learning rate for a while, and continues in the same process (`Trainer.rewind`). Its plan is
written to `run_dir/rewind.json` before anything is moved, so a run killed in the middle of a rewind
finishes the same rewind when it resumes.
"""

from __future__ import annotations

import math
from collections import deque
from pathlib import Path

import torch

from optim.skip_step import RECORD

REWIND_FILE = "rewind.json"  # the last rewind's plan (pretrain.trainer.Trainer.rewind)


class StepRecords:
    """Each step's record, copied to the host without waiting (pinned memory and an event on a GPU)
    and read later: a step late, or at once on a step that is logged."""

    def __init__(self, names: tuple[str, ...] = RECORD):
        self.names = names
        self.pending: deque[tuple[int, torch.Tensor, object]] = deque()

    def put(self, step: int, record: torch.Tensor) -> None:
        if record.is_cuda:
            host = torch.empty(record.shape, dtype=record.dtype, pin_memory=True)
            host.copy_(record, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host, done = record, None
        self.pending.append((step, host, done))

    def take(self, upto: int) -> list[tuple[int, dict]]:
        """The records of steps <= `upto`, oldest first, as {name: float}."""
        out = []
        while self.pending and self.pending[0][0] <= upto:
            step, host, done = self.pending.popleft()
            if done is not None:
                done.synchronize()
            out.append((step, dict(zip(self.names, host.tolist()))))
        return out

    def clear(self) -> None:
        self.pending.clear()


def _plain(x: float) -> float | str:
    """A number a checkpoint's JSON state and metrics.jsonl hold as it is ("nan", "inf" as strings)."""
    return x if math.isfinite(x) else str(x)


class Recovery:
    """The rewind policy's state: recent dropped steps, rewinds done, the lowered-LR window, the rows
    skipped. Saved with the trainer's state."""

    def __init__(self, cfg):  # cfg: pretrain.callbacks.spike.SpikeConfig
        self.cfg = cfg
        self.skips: list[int] = []  # steps dropped by the spike rule within the last rewind.within steps
        self.rewinds = 0
        self.lr_until = 0  # steps before this one train at rewind.lr_factor times the rate
        self.rows_skipped = 0
        self.events: list[dict] = []

    def lr_scale(self, step: int) -> float:
        """The factor on the schedule's rate for `step` (0-based steps done so far)."""
        return self.cfg.rewind.lr_factor if step < self.lr_until else 1.0

    def observe(self, step: int, record: dict) -> dict | None:
        """The trigger of a rewind that `step`'s record calls for, or None (always None unless the policy
        is rewind)."""
        if self.cfg.action != "rewind":
            return None
        r = self.cfg.rewind
        if record["skipped"]:
            self.skips.append(step)
        self.skips = [s for s in self.skips if s > step - r.within]
        nonfinite = bool(record["nonfinite"])
        if not nonfinite and len(self.skips) < r.skips:
            return None
        spikes = self.skips or [step]
        return {"reason": "non-finite loss or gradient" if nonfinite else f"{len(self.skips)} dropped steps within "
                f"{r.within}", "first_spike": spikes[0], "last_spike": spikes[-1], "spike_steps": list(spikes),
                **{k: _plain(record[k]) for k in ("loss", "grad_norm", "loss_z", "grad_z")}}

    def plan(self, trigger: dict, at_step: int, target: Path, target_step: int, global_batch: int) -> dict:
        """What a rewind to checkpoint `target` does, as written to rewind.json: the event and the
        recovery state after it."""
        r = self.cfg.rewind
        resume_data_at = trigger["last_spike"] + r.margin  # the data of steps (target_step, this] is skipped
        rows = (resume_data_at - target_step) * global_batch
        event = {"event": "rewind", "rewind": self.rewinds + 1, "at_step": at_step, "to_step": target_step,
                 "checkpoint": target.name, "data_rows_skipped": rows,
                 "data_steps_skipped": resume_data_at - target_step,
                 "lr_factor": r.lr_factor, "lr_steps": r.lr_steps, **trigger}
        after = {"skips": [], "rewinds": self.rewinds + 1, "lr_until": target_step + r.lr_steps,
                 "rows_skipped": self.rows_skipped + rows, "events": [*self.events, event]}
        return {"target_step": target_step, "rows": rows, "event": event, "recovery": after}

    def state_dict(self) -> dict:
        return {"skips": list(self.skips), "rewinds": self.rewinds, "lr_until": self.lr_until,
                "rows_skipped": self.rows_skipped, "events": [dict(e) for e in self.events]}

    def load_state_dict(self, state: dict) -> None:
        self.skips = [int(s) for s in state["skips"]]
        self.rewinds, self.lr_until = int(state["rewinds"]), int(state["lr_until"])
        self.rows_skipped = int(state["rows_skipped"])
        self.events = [dict(e) for e in state["events"]]

    def summary(self) -> str:
        if not self.events:
            return "none"
        return "; ".join(f"step {e['at_step']} -> {e['to_step']} ({e['reason']}, {e['data_rows_skipped']} rows skipped)"
                         for e in self.events)
