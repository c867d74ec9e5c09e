"""The callback interface: what a callback declares (name, order, ranks), how it is built from the run,
the hooks the trainer calls at fixed points, its state in checkpoints and its lines in the run summary.

The trainer holds its callbacks by name, calls them in order at each hook, and saves and restores each
one's `state_dict` under its name, so two callbacks of one class never collide.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch

    from optim.optimizer import KeelOptimizer
    from pretrain.config import KeelConfig
    from pretrain.distributed import World


class Ranks(StrEnum):
    every = "every"  # every rank: it acts on the update or uses collectives
    main = "main"  # rank 0 only: it writes files or prints


# Call order, lowest first. Below METRICS_ORDER a callback may act on the update and add to the step's
# metrics; the metrics logger (METRICS_ORDER) writes the row; later ones only read it.
METRICS_ORDER = 100


@dataclass(frozen=True)
class RunContext:
    """What a callback is built from: the run's config and the parts it may watch."""

    cfg: KeelConfig
    world: World
    run_dir: Path
    model: torch.nn.Module  # the bare GPT (this rank's pipeline stage), not its DDP wrapper
    optimizer: KeelOptimizer


class Callback:
    """Declare `name`, `order` and `ranks`; override `build` to read the config, and the hooks you need
    (every hook, the state methods and `summary` have do-nothing defaults)."""

    name: ClassVar[str] = ""  # its key in the trainer and in checkpoints: a shipped name never changes
    order: ClassVar[int] = 50  # call order at every hook, lowest first (see METRICS_ORDER)
    ranks: ClassVar[Ranks] = Ranks.every
    # False when the state describes this rank's share of a split model (it then restarts when a
    # checkpoint is resumed at another parallel layout)
    layout_free: ClassVar[bool] = True

    @classmethod
    def build(cls, run: RunContext) -> Callback | None:
        """This callback for `run`, or None when the run's config leaves it off."""
        return cls()

    def on_train_start(self, trainer) -> None:
        """Before the first step (after a resume has restored the trainer and every callback)."""

    def on_step_start(self, trainer) -> None:
        """Before a step's forward/backward; `trainer.step` is the number of steps done so far."""

    def on_before_update(self, trainer, loss: torch.Tensor) -> None:
        """After forward/backward, before the optimizer step; `loss` is on the device (reading it is a
        host sync: the spike handling acts on the update, `logging.monitors.spike`)."""

    def on_step_record(self, trainer, step: int, record: dict) -> None:
        """When the trainer reads step `step`'s record ({loss, grad_norm, skipped, nonfinite, loss_z,
        grad_z}: `optim.skip_step.RECORD`): a step late, or at once on a logged step; every step once, in order."""

    def on_rewind(self, trainer, event: dict) -> None:
        """After a rewind (`pretrain.recovery`) reloaded checkpoint `event["step"]`: the event, as logged."""

    def on_step_end(self, trainer, metrics: dict) -> None:
        """After the step; add to `metrics` to have it logged (callbacks run in order)."""

    def on_eval_set(self, trainer, key: str) -> None:
        """Right after one validation set was scored, before the next; `key` is its metric (val_loss or
        val_loss/NAME). Runs on every rank."""

    def on_eval(self, trainer, metrics: dict) -> None:
        """After a validation pass; `metrics` holds `val_loss`."""

    def on_start_eval(self, trainer, metrics: dict) -> None:
        """After the validation before the first step (trainer.eval_at_start): `metrics` holds step 0 and
        the validation losses only (no training loss); add to it to have it logged."""

    def on_train_end(self, trainer) -> None:
        """Once, also when training stops early."""

    def state_dict(self) -> dict:
        """What a resume needs to continue exactly: tensors, numbers, strings, lists and dicts only."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""

    def summary(self, rows: list[dict]) -> dict[str, str]:
        """Lines of the run's closing summary, {label: text}, from every logged metrics row (on rank 0)."""
        return {}
