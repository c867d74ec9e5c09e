"""Learning-rate schedules as pure functions of the step: constant, cosine, warmup-stable-decay."""

from __future__ import annotations

import math

from optim.config import ScheduleConfig


def lr_factor(step: int, max_steps: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based), in [min_lr_ratio, 1] after warmup."""
    # 1. linear warmup from peak/warmup to peak
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.name == "constant":
        return 1.0
    # 2. decay over the steps after warmup
    decay_steps = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    if cfg.name == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # 3. wsd: hold the peak, then decay linearly over the last `decay_fraction` of the run
    stable_end = 1.0 - cfg.decay_fraction
    if progress <= stable_end:
        return 1.0
    return 1.0 - (1 - floor) * (progress - stable_end) / cfg.decay_fraction
