"""The callback interface: hooks the trainer calls at fixed points, and state saved in checkpoints.

The trainer holds its callbacks by name, calls them in that order at each hook, and saves and
restores each one's `state_dict` under its name, so two callbacks of one class never collide.
"""

from __future__ import annotations


class Callback:
    """Override the hooks you need; every hook and the state methods have do-nothing defaults."""

    # False when the state describes this rank's share of a split model (it then restarts when a
    # checkpoint is resumed at another parallel layout)
    layout_free = True

    def on_train_start(self, trainer) -> None:
        """Before the first step (after a resume has restored the trainer and every callback)."""

    def on_step_start(self, trainer) -> None:
        """Before a step's forward/backward; `trainer.step` is the number of steps done so far."""

    def on_before_update(self, trainer, loss: float) -> str | None:
        """After forward/backward, before the optimizer step: return "skip" or "stop" to act."""

    def on_step_end(self, trainer, metrics: dict) -> None:
        """After the step; add to `metrics` to have it logged (callbacks run in order)."""

    def on_eval_set(self, trainer, key: str) -> None:
        """Right after one validation set was scored, before the next; `key` is its metric (val_loss or
        val_loss/NAME). Runs on every rank."""

    def on_eval(self, trainer, metrics: dict) -> None:
        """After a validation pass; `metrics` holds `val_loss`."""

    def on_train_end(self, trainer) -> None:
        """Once, also when training stops early."""

    def state_dict(self) -> dict:
        """What a resume needs to continue exactly: tensors, numbers, strings, lists and dicts only."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""
