"""Peak learning rate per parameter group. The width rules arrive with the width-scaling work."""

from __future__ import annotations

from pretrain.config import ModelConfig, OptimConfig


def peak_lrs(optim: OptimConfig, model: ModelConfig) -> dict[str, float]:
    return {g: optim.lr for g in ("embedding", "hidden", "readout", "norm")}
