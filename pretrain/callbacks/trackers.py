"""Experiment trackers behind one small interface: what the metrics logger (metrics.py) sends every row it
writes to metrics.jsonl, and the files of the run when training ends. TensorBoard (`logging.tensorboard`)
and Weights & Biases (`logging.wandb`, the `wandb` extra) implement it; rank 0 only, as the logger is."""

from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Protocol

from models.config import check_choices, choice, choices

WandbMode = choices("WandbMode", "online", "offline")  # offline: files in the run folder, `wandb sync` later


class Tracker(Protocol):
    def log(self, metrics: dict, step: int) -> None:
        """One metrics row (the step's scalars, a few strings such as spike_action)."""

    def finish(self, files: dict[str, Path]) -> None:
        """Training ended: attach the run's images (name -> PNG that exists), then close."""

    def summary(self) -> dict[str, str]:
        """Its lines of the run's closing summary: where to look."""


class TensorBoard:
    """The numeric scalars as TensorBoard events in run_dir/tensorboard."""

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        self.writer = SummaryWriter(str(folder))

    def log(self, metrics: dict, step: int) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def finish(self, files: dict[str, Path]) -> None:
        self.writer.close()

    def summary(self) -> dict[str, str]:
        return {"tensorboard": str(self.folder)}


@dataclass
class WandbConfig:
    """`logging.wandb`: a Weights & Biases run per keel run, resumed with it."""

    enabled: bool = False
    project: str = "keel"
    entity: Optional[str] = None  # None: the account's default
    name: Optional[str] = None  # None: the run's `name`
    tags: list[str] = field(default_factory=list)
    mode: str = choice(WandbMode, "online")

    def __post_init__(self):
        check_choices("logging.wandb", self)


class Wandb:
    """One W&B run for the whole keel run: its id is kept in run_dir/wandb_run_id, so a resumed keel run
    logs into the same W&B run. Rows carry their `step` as W&B's x-axis (`define_metric`), so the rows a
    resume logs again (those past the checkpoint it restarts from) are kept, not refused as old steps."""

    ID_FILE = "wandb_run_id"

    def __init__(self, settings: WandbConfig, run_dir: Path, run_name: str, config: dict, wandb=None):
        from pretrain.errors import require_extra

        self.wandb = wandb or require_extra("wandb", "wandb")
        self.run_id = self._run_id(run_dir / self.ID_FILE)
        self.run = self.wandb.init(project=settings.project, entity=settings.entity, name=settings.name or run_name,
                                   tags=list(settings.tags), mode=str(settings.mode), id=self.run_id, resume="allow",
                                   dir=str(run_dir), config=config)
        self.run.define_metric("*", step_metric="step")
        self.folder = run_dir / "wandb"

    @staticmethod
    def _run_id(path: Path) -> str:
        """The id the run folder keeps, or a new one written there (whole: `rundir.write_text`)."""
        from pretrain.rundir import write_text

        if path.exists():
            return path.read_text().strip()
        run_id = secrets.token_hex(4)  # W&B ids: lowercase letters and digits
        write_text(path, run_id + "\n")
        return run_id

    def log(self, metrics: dict, step: int) -> None:
        # a skipped step's NaN gradient norm (and any non-finite value) is left out: W&B's charts cannot
        # draw it, and metrics.jsonl keeps it
        finite = {k: v for k, v in metrics.items() if not (isinstance(v, float) and not math.isfinite(v))}
        self.run.log({**finite, "step": step})

    def finish(self, files: dict[str, Path]) -> None:
        images = {name: self.wandb.Image(str(path)) for name, path in files.items()}
        if images:
            self.run.log(images)
        self.run.finish()

    def summary(self) -> dict[str, str]:
        return {"wandb": f"run {self.run_id} ({self.folder})"}


def build_trackers(cfg, run_dir: Path) -> list[Tracker]:
    """The trackers `cfg.logging` turns on."""
    trackers: list[Tracker] = [TensorBoard(run_dir / "tensorboard")] if cfg.logging.tensorboard else []
    if cfg.logging.wandb.enabled:
        trackers.append(Wandb(cfg.logging.wandb, run_dir, cfg.name, asdict(cfg)))
    return trackers
