"""Profiling on demand: a window of training steps traced with torch.profiler, one Chrome/Perfetto trace
per rank in run_dir/profile/, and on CUDA a memory snapshot (torch.cuda.memory) after a chosen step.
Off by default, and then not built at all: no cost."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from models.config import check
from pretrain.callbacks.base import Callback, RunContext


@dataclass
class ProfileConfig:
    """`trainer.profile`: steps start .. start + steps - 1 traced (start 0: off)."""

    start: int = 0
    steps: int = 3
    # CUDA only: allocator history recorded from `start`, its snapshot written after this step
    # (open it at pytorch.org/memory_viz); None: none
    memory_snapshot_step: Optional[int] = None

    def __post_init__(self):
        check(self.start >= 0 and self.steps >= 1, f"trainer.profile: start={self.start} must be >= 0 (0: off) and "
                                                   f"steps={self.steps} >= 1")
        check(self.memory_snapshot_step is None or self.memory_snapshot_step >= self.start >= 1,
              f"trainer.profile.memory_snapshot_step={self.memory_snapshot_step} needs trainer.profile.start "
              "set, at or before it")


class StepProfiler(Callback):
    """The window's trace: `profile/trace_rank{R}_steps{A}-{B}.json` (A, B the first and last step traced)."""

    name, order = "profile", 0  # first at a step's start, so the window holds every other callback's work

    @classmethod
    def build(cls, run: RunContext) -> StepProfiler | None:
        p = run.cfg.trainer.profile
        return cls(p, run.run_dir / "profile", run.world.rank, run.world.device) if p.start else None

    def __init__(self, settings: ProfileConfig, folder: Path, rank: int, device: torch.device):
        self.settings, self.folder, self.rank = settings, folder, rank
        self.cuda = device.type == "cuda"
        self.profiler = None
        self.first = 0  # the first step traced

    def on_step_start(self, trainer) -> None:
        step = trainer.step + 1  # the step about to run
        if step != self.settings.start:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        kinds = torch.profiler.ProfilerActivity
        activities = [kinds.CPU, kinds.CUDA] if self.cuda else [kinds.CPU]
        self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)
        self.profiler.__enter__()
        self.first = step
        if self.cuda and self.settings.memory_snapshot_step is not None:
            torch.cuda.memory._record_memory_history()

    def on_step_end(self, trainer, metrics: dict) -> None:
        step = metrics["step"]
        if self.cuda and step == self.settings.memory_snapshot_step:
            self._write(f"memory_rank{self.rank}_step{step}.pickle", torch.cuda.memory._dump_snapshot)
            torch.cuda.memory._record_memory_history(enabled=None)
        if self.profiler is not None and step == self.settings.start + self.settings.steps - 1:
            self._stop(step)

    def on_train_end(self, trainer) -> None:
        if self.profiler is not None:  # training ended inside the window: the steps traced so far
            self._stop(trainer.step)

    def _stop(self, last: int) -> None:
        self.profiler.__exit__(None, None, None)
        self._write(f"trace_rank{self.rank}_steps{self.first}-{last}.json", self.profiler.export_chrome_trace)
        self.profiler = None

    def _write(self, name: str, export) -> None:
        """`export(path)` under a temporary name, then renamed: a trace that is there is whole."""
        tmp = self.folder / f".{name}.tmp"
        export(str(tmp))
        tmp.replace(self.folder / name)

    def summary(self, rows: list[dict]) -> dict[str, str]:
        return {"profile": str(self.folder)}
