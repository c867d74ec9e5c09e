"""Everything keel's optimizer does with megatron-core's optimizer internals, in one place, for the one
release it was read from (`models.megatron_release.PINNED`): another release stops with one line saying what
to install.

1. `chained`: the torch-level optimizers inside megatron's (a ChainedOptimizer holds one per group set).
2. `main_param_range`: the flat range of a parameter that its fp32 main copy holds under the distributed
   optimizer (its private per-parameter range map).
3. `prepare_to_load`: a fresh distributed optimizer has no state, and its `sharded_state_dict` needs one
   to shape what it loads into: its private dummy initialisation makes it.
4. `patch_fully_reshardable_load` (applied once per process, when an optimizer is built): torch's Adam
   keeps a "step" tensor per parameter, which 0.19.2's fully reshardable load then looks up among the
   loaded tensors, where it never is (`DistributedOptimizer._set_main_param_and_optimizer_states`, a
   KeyError); such a key is passed as "nothing to copy", and `restore_adam_steps` sets the steps after.
5. `restore_adam_steps`: without apex/TE megatron keeps the step in each param group, and on load either
   leaves the step of its dummy initialisation in the per-parameter state or shares one tensor across all
   parameters, which torch's AdamW then increments once per parameter: each parameter gets its own.
"""

from __future__ import annotations

import functools

import torch

from models import megatron_release
from models.config import ConfigError


def require_release() -> None:
    """One line when the installed megatron-core is not the release this module was written for."""
    megatron_release.require(__name__, "optimizer internals", ConfigError)


def chained(megatron_optimizer) -> list:
    """The optimizers inside megatron's optimizer: a ChainedOptimizer's parts, or the optimizer itself."""
    from megatron.core.optimizer import ChainedOptimizer

    if isinstance(megatron_optimizer, ChainedOptimizer):
        return list(megatron_optimizer.chained_optimizers)
    return [megatron_optimizer]


def _distributed(megatron_optimizer) -> list:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [opt for opt in chained(megatron_optimizer) if isinstance(opt, DistributedOptimizer)]


def main_param_range(megatron_optimizer, p: torch.Tensor) -> tuple[int, int]:
    """The flat range of `p` that its fp32 main copy holds: a shard under the distributed optimizer
    (megatron's per-parameter range map), else the whole parameter."""
    if getattr(p, "main_param_sharded", False):
        require_release()
        for opt in _distributed(megatron_optimizer):
            if p in opt.model_param_gbuf_map:
                r = opt._get_model_param_range_map(p)["param"]
                return r.start, r.end
        raise RuntimeError("a sharded main parameter that no distributed optimizer owns")
    return 0, p.numel()


def prepare_to_load(megatron_optimizer) -> None:
    """Give each distributed optimizer that has no state yet its dummy state, to shape the load."""
    require_release()
    for opt in _distributed(megatron_optimizer):
        if not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def patch_fully_reshardable_load() -> None:
    """Let the fully reshardable load pass over the "step" key it cannot find (see the module's 4.);
    idempotent: the patched method is marked."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    require_release()
    copy_states = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(copy_states, "keel_patched", False):
        return

    @functools.wraps(copy_states)
    def without_step(self, model_param, tensors):
        return copy_states(self, model_param, {"step": None, **tensors})

    without_step.keel_patched = True
    DistributedOptimizer._set_main_param_and_optimizer_states = without_step


def restore_adam_steps(megatron_optimizer) -> None:
    """Give every parameter its own, correct Adam step after loading (see the module's 5.)."""
    for opt in chained(megatron_optimizer):
        for group in opt.optimizer.param_groups:
            if group.get("step") is None:
                continue
            # the fused kernel reads each step from the parameter's device
            device = None if not group.get("fused") else group["params"][0].device
            for p in group["params"]:
                if p in opt.optimizer.state:
                    opt.optimizer.state[p]["step"] = torch.tensor(float(group["step"]), dtype=torch.float32,
                                                                  device=device)
