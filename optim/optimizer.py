"""The whole optimizer: megatron-core's optimizer over the DDP-wrapped model, the per-group peak
learning rates, and keel's update rule (`optim.rules`) that acts after megatron's step.

`build_optimizer` returns one `KeelOptimizer`; the trainer and checkpoints use only its methods.
Parameters fall into four groups by their megatron-core names (`optim.lr_rules.param_group`), each with
its own peak LR; norms and biases get no weight decay. What this needs of megatron's internals is in
`optim.megatron_private`.
"""

from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

from models.config import ModelConfig
from optim.config import OptimConfig, OptimizerName
from optim.lr_rules import GROUPS, param_group, peak_lrs
from optim.megatron_private import chained, patch_fully_reshardable_load, prepare_to_load, restore_adam_steps
from optim.rules import UpdateRule, build_rule
from optim.skip_step import SkipDecider, SkipRule, UpdateGuard, clip_grads, grad_norm


class KeelOptimizer:
    """megatron's optimizer, the peak LR of each parameter group, an optional update rule, and the
    device-side skip decision and guard (`optim.skip_step`) every update goes through."""

    def __init__(self, megatron, peak_lrs: dict[str, float], base_lr: float, rule: UpdateRule | None = None,
                 model: torch.nn.Module | None = None, clip: float = 0.0):
        self.megatron, self.peak_lrs, self.base_lr, self.rule = megatron, dict(peak_lrs), base_lr, rule
        self.clip = clip
        self.guard = UpdateGuard(megatron, model, rule) if model is not None else None
        self.decider: SkipDecider | None = None

    def use_skip_rule(self, rule: SkipRule, device: torch.device) -> None:
        """Judge every update by `rule` (the trainer sets it from `logging.monitors.spike`)."""
        self.decider = SkipDecider(rule, device)

    @property
    def param_groups(self) -> list[dict]:
        return self.megatron.param_groups

    def set_lr(self, factor: float) -> dict[str, float]:
        """Apply the schedule's factor to every group's peak; return the effective LR per LR group."""
        for group in self.megatron.param_groups:
            group["lr"] = self.base_lr * group["lr_mult"] * factor
        return {f"lr/{name}": peak * factor for name, peak in self.peak_lrs.items()}

    def zero_grad(self) -> None:
        self.megatron.zero_grad()

    def step(self, loss: torch.Tensor) -> torch.Tensor:
        """Clip and update with no host sync: this step's record (`optim.skip_step.RECORD`, on the device),
        whose "skipped" entry says whether the update was dropped (a non-finite loss or gradient, or a
        spike by the skip rule); a dropped update leaves every parameter and state bit-identical."""
        # 1. megatron's gradient preparation (main-gradient copies), then keel's norm and clipping on the device
        self.megatron.prepare_grads()
        norm = grad_norm(self.megatron)
        clip_grads(self.megatron, norm, self.clip)
        # 2. the decision, then the update, selected back where the decision drops it
        if self.decider is None:
            self.use_skip_rule(SkipRule(enabled=False), norm.device)
        record = self.decider.decide(loss.to(norm.device), norm)

        def inner():
            return self.megatron.step_with_ready_grads(), norm, None

        self.guard.run(lambda: self.rule.step(inner) if self.rule else inner(), record[2] == 0)
        return record

    def pop_stats(self) -> dict[str, float]:
        """The update rule's statistics since the last call (empty without one)."""
        return self.rule.pop_stats() if self.rule else {}

    # ---- checkpoints: megatron's sharded state, and keel's own (the update rule's) --------------
    def sharded_state_dict(self, model_sharded: dict, is_loading: bool) -> dict:
        if is_loading:
            prepare_to_load(self.megatron)
        # fully_reshardable: the distributed optimizer's state in each parameter's own shape (gathered on
        # DP rank 0 when saving), so a checkpoint resumes at any TP/PP/DP layout
        return self.megatron.sharded_state_dict(model_sharded, is_loading=is_loading,
                                                metadata={"distrib_optim_sharding_type": "fully_reshardable"})

    @torch.no_grad()  # the distributed optimizer copies into leaf tensors
    def load_sharded_state_dict(self, state: dict) -> float | None:
        """Load megatron's optimizer state; returns the checkpoint's `optim.lr` when it differs from this
        run's (the new rate applies from the next step, as `set_lr` sets every group's rate each step)."""
        saved_lr = self._match_rate(state)
        self.megatron.load_state_dict(state)
        restore_adam_steps(self.megatron)
        return saved_lr

    def _match_rate(self, state) -> float | None:
        """megatron pairs saved and current parameter groups by a key that holds the peak rate (`max_lr`,
        `min_lr`), so a run resumed with another `optim.lr` would find no group. keel sets each group's rate
        itself (`set_lr`) and never reads those two, so the saved groups take this run's values."""
        current = self.megatron.param_groups[0]
        rate = {"max_lr": current.get("max_lr"), "min_lr": current.get("min_lr")}
        saved = set()
        for group in _saved_param_groups(state):
            saved.add(group.get("max_lr"))
            group.update(rate)
        return next(iter(saved)) if saved and saved != {rate["max_lr"]} else None

    def state_dict(self) -> dict:
        state = {"rule": self.rule.state_dict()} if self.rule else {}
        return state | ({"skip": self.decider.state_dict()} if self.decider else {})

    def load_state_dict(self, state: dict) -> None:
        if self.rule:
            self.rule.load_state_dict(state["rule"])
        if self.decider and "skip" in state:  # a run folder from before skip-step starts with empty windows
            self.decider.load_state_dict(state["skip"])


def _saved_param_groups(state):
    """Every parameter group (a dict with `max_lr`) in a loaded optimizer state, however megatron nests it."""
    if isinstance(state, dict):
        if "max_lr" in state and "lr_mult" in state:
            yield state
            return
        for value in state.values():
            yield from _saved_param_groups(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _saved_param_groups(value)


def build_optimizer(cfg: OptimConfig, model: ModelConfig, ddp_model, gpt: torch.nn.Module, dtype: torch.dtype,
                    tp_group=None) -> KeelOptimizer:
    """megatron's optimizer over `ddp_model` (each param group's peak LR is `optim.lr * lr_mult`), with
    the update rule `cfg` asks for acting on the bare model `gpt`."""
    peaks = peak_lrs(cfg, model)
    megatron = get_megatron_optimizer(megatron_optimizer_config(cfg, dtype), [ddp_model],
                                      config_overrides=_group_overrides(peaks, cfg.lr))
    for group in megatron.param_groups:
        group["weight_decay"] = cfg.weight_decay * group.get("wd_mult", 1.0)
    use_fused_adam(megatron)
    patch_fully_reshardable_load()
    return KeelOptimizer(megatron, peaks, cfg.lr, build_rule(cfg, megatron, gpt, tp_group), gpt, cfg.grad_clip)


def use_fused_adam(megatron) -> None:
    """torch's fused AdamW (one kernel over all of a group's fp32 main parameters) for groups on a GPU.
    Without apex/TransformerEngine megatron-core builds torch's AdamW with neither `fused` nor
    `foreach`; torch reads both from each group at every step. CPU groups keep the per-parameter loop,
    so CPU runs keep their exact numbers."""
    for opt in chained(megatron):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Adam):  # AdamW derives from Adam
            continue
        for group in inner.param_groups:
            if group["params"] and all(p.is_cuda for p in group["params"]):
                group["fused"], group["foreach"] = True, False


def megatron_optimizer_config(cfg: OptimConfig, dtype: torch.dtype) -> OptimizerConfig:
    return OptimizerConfig(
        optimizer="adam" if cfg.name == OptimizerName.adamw else "sgd", lr=cfg.lr, min_lr=0.0,
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
