"""Update rules: what acts on an update after megatron's optimizer made it (`optim.spectral.enabled`:
the spectral bound; `optim.quack`: per-head query/key rates). Each runs megatron's step and then
reshapes the update it made; its state is tensors and numbers, saved with keel's own checkpoint state.

A new rule is a module here (a class with the `UpdateRule` methods; `main_params` gives the fp32 main
copy the same update) and one line in `build_rule`, with its switch in `optim/config.py`.
"""

from __future__ import annotations

from typing import Protocol

import torch

from optim.config import OptimConfig


class UpdateRule(Protocol):
    def step(self, inner_step) -> tuple: ...  # runs inner_step() (megatron's step), returns what it returned
    def pop_stats(self) -> dict[str, float]: ...  # metrics since the last call
    def live_state(self) -> dict: ...  # the state a step changes in place or replaces (a dropped step restores it)
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def build_rule(cfg: OptimConfig, megatron_optimizer, gpt: torch.nn.Module, tp_group=None) -> UpdateRule | None:
    """The update rule `cfg` asks for, acting on the bare model `gpt`; None: megatron's update as it is."""
    if cfg.spectral.enabled:
        from optim.rules.spectral_bound import SpectralBoundRule

        return SpectralBoundRule(megatron_optimizer, gpt, cfg.spectral, tp_group)
    if cfg.quack:
        from optim.rules.quack import QuackRule

        return QuackRule(megatron_optimizer, gpt)
    return None
