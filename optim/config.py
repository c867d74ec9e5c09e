"""The optimizer's configuration: the inner optimizer, its per-group learning-rate rules, the schedule,
and the update rules that act after megatron's step (the spectral bound, QuacK).

Validation as in `models/config.py`: one `ValueError` line per problem, choices as `StrEnum`s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from models.config import check, check_choices, check_positive, choice, choices

OptimizerName = choices("OptimizerName", "adamw", "sgd")
LRRule = choices("LRRule", "global", "sp_width", "layerwise")  # see optim/lr_rules.py
LayerwisePreset = choices("LayerwisePreset", "max_stable", "everett_adam")  # exponent tables in optim/lr_rules.py
ScheduleName = choices("ScheduleName", "constant", "cosine", "wsd")


@dataclass
class SpectralConfig:
    enabled: bool = False
    tau: float = 0.05  # chosen by the ablation in docs/results/warmup_free.md
    power_iters: int = 3
    bound_embeddings: bool = False

    def __post_init__(self):
        check(self.tau > 0 or math.isinf(self.tau), f"optim.spectral.tau must be positive (inf disables), got {self.tau}")
        check(self.power_iters >= 1, f"optim.spectral.power_iters must be >= 1, got {self.power_iters}")


@dataclass
class LayerwiseConfig:
    """Per-group width exponents of `optim.lr_rule=layerwise`: eta_g = lr * (n / n0)^-alpha_g."""

    preset: str = choice(LayerwisePreset, "max_stable")  # Haas et al. 2025 | Everett et al. 2024
    embedding: Optional[float] = None  # None: the preset's exponent
    hidden: Optional[float] = None
    readout: Optional[float] = None
    norm: Optional[float] = None

    def __post_init__(self):
        check_choices("optim.layerwise", self)


@dataclass
class OptimConfig:
    name: str = choice(OptimizerName, "adamw")
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    momentum: float = 0.9  # sgd
    grad_clip: float = 1.0  # 0 disables
    distributed: bool = False  # megatron's distributed optimizer (ZeRO-1 style sharding over DP)
    lr_rule: str = choice(LRRule, "global")
    base_width: int = 128  # n0 of the width rules
    width_exponent: Optional[float] = None  # alpha; None: the paper's value for the optimizer
    layerwise: LayerwiseConfig = field(default_factory=LayerwiseConfig)
    spectral: SpectralConfig = field(default_factory=SpectralConfig)
    quack: bool = False  # per-head query/key learning rates ∝ 1/‖W_K‖, 1/‖W_Q‖ (optim/rules/quack.py)

    def __post_init__(self):
        check_choices("optim", self)
        check_positive("optim", self, "lr", "eps", "base_width")
        for name in ("weight_decay", "grad_clip", "momentum"):
            check(getattr(self, name) >= 0, f"optim.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            check(0 <= getattr(self, name) < 1, f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        check(not (self.distributed and self.name != OptimizerName.adamw),
              "optim.distributed=true needs optim.name=adamw (megatron's distributed optimizer is Adam-only)")
        check(not (self.quack and self.spectral.enabled),
              "optim.quack and optim.spectral.enabled are alternatives; enable one of them")


@dataclass
class ScheduleConfig:
    name: str = choice(ScheduleName, "cosine")
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # final LR as a fraction of the peak
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying

    def __post_init__(self):
        check_choices("lr", self)
        check(self.warmup_steps >= 0, f"lr.warmup_steps must be >= 0, got {self.warmup_steps}")
        check(0 <= self.min_lr_ratio <= 1, f"lr.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        check(0 < self.decay_fraction <= 1, f"lr.decay_fraction must be in (0, 1], got {self.decay_fraction}")
