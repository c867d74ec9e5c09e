"""Learning-rate schedules as pure functions of the step: a linear warmup, then one decay shape per
`lr.name` (constant, cosine, warmup-stable-decay)."""

from __future__ import annotations

import math

from optim.config import ScheduleConfig, ScheduleName


def _constant(progress: float, cfg: ScheduleConfig) -> float:
    return 1.0


def _cosine(progress: float, cfg: ScheduleConfig) -> float:
    floor = cfg.min_lr_ratio
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _wsd(progress: float, cfg: ScheduleConfig) -> float:
    """Hold the peak, then decay linearly over the last `decay_fraction` of the run."""
    floor, stable_end = cfg.min_lr_ratio, 1.0 - cfg.decay_fraction
    if progress <= stable_end:
        return 1.0
    return 1.0 - (1 - floor) * (progress - stable_end) / cfg.decay_fraction


DECAY = {ScheduleName.constant: _constant, ScheduleName.cosine: _cosine, ScheduleName.wsd: _wsd}  # by lr.name


def lr_factor(step: int, max_steps: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based), in [min_lr_ratio, 1] after warmup."""
    decay = DECAY.get(cfg.name)
    if decay is None:  # ScheduleConfig checks the name; this catches one set after that check
        raise ValueError(f"lr.name={cfg.name!r} is unknown; choose one of {', '.join(DECAY)}")
    # 1. linear warmup from peak/warmup to peak
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    # 2. the decay shape over the steps after warmup
    decay_steps = max(1, max_steps - cfg.warmup_steps)
    return decay(min(1.0, (step - cfg.warmup_steps) / decay_steps), cfg)
