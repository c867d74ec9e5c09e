"""The optimizer: megatron-core's `get_megatron_optimizer` over megatron's DDP-wrapped model.

Parameters fall into four groups by their megatron-core names (embedding, hidden, readout, norm),
each with its own peak LR (see `optim/lr_rules.py`); norms and biases get no weight decay.
"""

from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

from pretrain.config import OptimConfig

GROUPS = ("embedding", "hidden", "readout", "norm")


def param_group(name: str, param: torch.Tensor) -> str:
    """The LR group of a parameter, from its megatron-core name.

    With tied embeddings the one shared matrix is the embedding; `readout` exists only untied.
    """
    if "word_embeddings" in name or "position_embeddings" in name:
        return "embedding"
    if "output_layer" in name:
        return "readout"
    if param.ndim < 2:
        return "norm"  # norm gains and biases
    return "hidden"


def megatron_optimizer_config(cfg: OptimConfig, dtype: torch.dtype) -> OptimizerConfig:
    return OptimizerConfig(
        optimizer="adam" if cfg.name == "adamw" else "sgd", lr=cfg.lr, min_lr=0.0,
        weight_decay=cfg.weight_decay, adam_beta1=cfg.beta1, adam_beta2=cfg.beta2, adam_eps=cfg.eps,
        sgd_momentum=cfg.momentum, clip_grad=cfg.grad_clip, bf16=dtype == torch.bfloat16,
        params_dtype=dtype, use_distributed_optimizer=cfg.distributed)


def _group_overrides(peak_lrs: dict[str, float], base_lr: float) -> dict:
    """One megatron param group per distinct (LR multiplier, weight-decay multiplier).

    megatron identifies groups across checkpoints by (wd_mult, lr_mult, ...), so LR groups that
    share both multipliers are merged: they would be updated identically anyway.
    """
    combos: dict[tuple[float, float], list[str]] = {}
    for group in GROUPS:
        combos.setdefault((peak_lrs[group] / base_lr, 0.0 if group == "norm" else 1.0), []).append(group)
    overrides = {}
    for (lr_mult, wd_mult), members in combos.items():
        match = ParamWithNamePredicate(name="keel_" + "+".join(members),
                                       fn=lambda p, n, m=tuple(members): param_group(n, p) in m)
        overrides[ParamKey(with_name_predicate=match)] = {"lr_mult": lr_mult, "wd_mult": wd_mult}
    return overrides


def build_optimizer(cfg: OptimConfig, model_chunks: list, dtype: torch.dtype, peak_lrs: dict[str, float]):
    """Megatron's optimizer; each param group's peak LR is `optim.lr * lr_mult`."""
    optimizer = get_megatron_optimizer(megatron_optimizer_config(cfg, dtype), model_chunks,
                                       config_overrides=_group_overrides(peak_lrs, cfg.lr))
    for group in optimizer.param_groups:
        group["weight_decay"] = cfg.weight_decay * group.get("wd_mult", 1.0)
    optimizer.keel_peak_lrs = dict(peak_lrs)
    optimizer.keel_base_lr = cfg.lr
    return optimizer


def set_lr(optimizer, factor: float) -> dict[str, float]:
    """Apply the schedule's factor to every group's peak; return the effective LR per LR group."""
    for group in optimizer.param_groups:
        group["lr"] = optimizer.keel_base_lr * group["lr_mult"] * factor
    return {f"lr/{name}": peak * factor for name, peak in optimizer.keel_peak_lrs.items()}
