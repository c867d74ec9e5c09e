"""Skip-step on the device: the gradient norm, clipping, a spike decision and a guarded update, all as
device tensors, so that a step whose update is dropped never waits for the host.

1. `grad_norm` / `clip_grads`: the global L2 norm of what megatron's optimizer steps (each chained
   optimizer's `get_grads_for_grad_norm`, reduced over its grad-statistics group, as megatron does),
   and clipping by it. megatron's own clipping reads the norm on the host (`.item()`).
2. `RollingWindow` / `SkipDecider`: a one-sided z-score of the loss and of the gradient norm against the
   last `window` accepted values (OLMo-core's rule: 128 steps, 6 sigma), in float64 on the device. The
   decision is max-reduced over the world, so every rank drops the same steps. The host detector
   (`pretrain.callbacks.spike.SpikeDetector`) applies the same rule to the loss and is the reference.
3. `UpdateGuard`: torch's AdamW (fused or not) takes no step factor, so the update cannot be scaled to
   nothing. Instead everything a step may change (model parameters, fp32 main copies, moments, step
   counts, the update rule's state) is copied before it and selected back with `torch.where` after:
   a dropped step leaves all of it bit-identical. Cost: one copy of parameters and optimizer state
   per step (memory and bandwidth), the price of working with any megatron optimizer unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from optim.megatron_private import chained

MIN_STD = 1e-6  # a flat window judges against this spread instead of zero (as the host detector)
RECORD = ("loss", "grad_norm", "skipped", "nonfinite", "loss_z", "grad_z")  # a step's record, in this order


# ---- 1. the gradient norm and clipping ------------------------------------------------------------
@torch.no_grad()
def grad_norm(megatron) -> torch.Tensor:
    """Global L2 norm of the gradients megatron's optimizer steps (float64, 0-dim, on the device), computed
    as megatron-core's own fallback does (per-tensor norms, the norm of those, squared and summed over the
    grad-statistics group), so that clipping by it gives megatron's numbers bit for bit."""
    by_group: dict = {}  # grad-statistics group -> its gradients (megatron joins optimizers that share one)
    for opt in chained(megatron):
        grads = opt.get_grads_for_grad_norm() if opt.get_parameters() else []
        by_group.setdefault(opt.get_grad_stats_parallel_group(), []).extend(grads)
    total = None
    for group, grads in by_group.items():
        device = grads[0].device if grads else _default_device()
        sq = torch.zeros(1, dtype=torch.float32, device=device)
        if grads:
            sq = torch.norm(torch.stack([torch.norm(g) for g in grads])).reshape(1) ** 2
        dist.all_reduce(sq, group=group)
        total = sq.double() if total is None else total + sq.double().to(total.device)
    return total[0].sqrt()


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


@torch.no_grad()
def clip_grads(megatron, norm: torch.Tensor, max_norm: float) -> None:
    """Scale every gradient by max_norm / (norm + 1e-6) where that is below 1 (megatron's rule); elsewhere
    the factor is exactly 1 and leaves the gradients bit-exact."""
    if max_norm <= 0:
        return
    coeff = max_norm / (norm.double() + 1e-6)
    scale = torch.where(coeff < 1.0, coeff, 1.0).float()
    for opt in chained(megatron):
        grads = [p.grad for p in opt.get_parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scale.to(grads[0].device))


# ---- 2. rolling statistics and the decision ------------------------------------------------------
class RollingWindow:
    """The last `window` accepted values as a float64 ring buffer on the device, and their count."""

    def __init__(self, window: int, device: torch.device):
        self.values = torch.zeros(window, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)  # accepted values ever

    def moments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values in the window, population mean, population std)."""
        n = self.count.clamp(max=self.values.numel())
        held = torch.arange(self.values.numel(), device=self.values.device) < n
        denom = n.clamp(min=1).to(torch.float64)
        mean = torch.where(held, self.values, 0).sum() / denom
        var = torch.where(held, (self.values - mean).square(), 0).sum() / denom
        return n, mean, var.sqrt()

    def zscore(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z of x against the window, values in the window)."""
        n, mean, std = self.moments()
        return (x.double() - mean) / std.clamp(min=MIN_STD), n

    def push(self, x: torch.Tensor, accept: torch.Tensor) -> None:
        """Add x where `accept` (a 0-dim bool), else leave the window as it is."""
        slot = (self.count % self.values.numel()).reshape(1)  # tensor indices: an int index would read it
        kept = torch.where(accept, x.double().reshape(1), self.values.index_select(0, slot))
        self.values.index_copy_(0, slot, kept)
        self.count += accept.to(torch.int64)

    def state_dict(self) -> dict:
        return {"values": self.values.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.values.copy_(state["values"])
        self.count.copy_(state["count"])


@dataclass(frozen=True)
class SkipRule:
    """When a step is dropped: z > loss_z of the loss or z > grad_z of the gradient norm (either may be
    inf: not judged) once min_count values are in a window; always for a non-finite loss or norm."""

    window: int = 128
    loss_z: float = 6.0
    grad_z: float = 6.0
    min_count: int = 20
    enabled: bool = True  # False: only non-finite steps are dropped (policy log or stop)


class SkipDecider:
    """The device-side decision of `SkipRule`, and its windows (saved with the checkpoint)."""

    def __init__(self, rule: SkipRule, device: torch.device):
        self.rule = rule
        self.loss = RollingWindow(rule.window, device)
        self.grad = RollingWindow(rule.window, device)

    @torch.no_grad()
    def decide(self, loss: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """This step's record (float64 [len(RECORD)] on the device); record[2] is 1 to drop the update.
        Collective: the drop is max-reduced over the world."""
        r = self.rule
        nonfinite = ~(torch.isfinite(loss) & torch.isfinite(norm))
        loss_z, loss_n = self.loss.zscore(loss)
        grad_z, grad_n = self.grad.zscore(norm)
        spike = (loss_n >= r.min_count) & (loss_z > r.loss_z) | (grad_n >= r.min_count) & (grad_z > r.grad_z)
        skip = (nonfinite | spike & r.enabled).to(torch.float64).reshape(1)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(skip, op=dist.ReduceOp.MAX)
        accept = skip[0] == 0
        self.loss.push(loss, accept)
        self.grad.push(norm, accept)
        return torch.stack([loss.double(), norm.double(), skip[0], nonfinite.double(), loss_z, grad_z])

    def state_dict(self) -> dict:
        return {"loss": self.loss.state_dict(), "grad_norm": self.grad.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.loss.load_state_dict(state["loss"])
        self.grad.load_state_dict(state["grad_norm"])


# ---- 3. the guarded update ------------------------------------------------------------------------
def _clone_tree(tree):
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: _clone_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_clone_tree(v) for v in tree)
    return tree


def _select_tree(live, before, keep: torch.Tensor):
    """`live` where `keep`, else `before`, leaf by leaf (tensors; other leaves are kept as they are).
    A tensor the step created (no `before`) is kept: a rule creates its state once, on its first step."""
    if isinstance(live, torch.Tensor):
        if isinstance(before, torch.Tensor) and before.shape == live.shape:
            live.copy_(torch.where(keep.to(live.device), live, before))
        return live
    if isinstance(live, dict):
        for k, v in live.items():
            live[k] = _select_tree(v, before.get(k) if isinstance(before, dict) else None, keep)
        return live
    if isinstance(live, list):
        for i, v in enumerate(live):
            live[i] = _select_tree(v, before[i] if isinstance(before, list) and i < len(before) else None, keep)
        return live
    if isinstance(live, tuple):
        old = before if isinstance(before, tuple) and len(before) == len(live) else (None,) * len(live)
        return tuple(_select_tree(v, o, keep) for v, o in zip(live, old))
    return live


class UpdateGuard:
    """Copies of what one update may change, to select them back when the update is dropped."""

    def __init__(self, megatron, model: torch.nn.Module, rule=None):
        self.megatron, self.model, self.rule = megatron, model, rule

    def _tensors(self) -> list[torch.Tensor]:
        """Model parameters and every parameter the torch optimizers hold (fp32 main copies, shards)."""
        seen, out = set(), []
        params = list(self.model.parameters())
        for opt in chained(self.megatron):
            for group in opt.optimizer.param_groups:
                params += group["params"]
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p.data)
        return out

    def _params(self) -> list[tuple[torch.optim.Optimizer, torch.Tensor]]:
        """(torch optimizer, parameter) for every parameter megatron's optimizers step."""
        return [(opt.optimizer, p) for opt in chained(self.megatron) for group in opt.optimizer.param_groups
                for p in group["params"]]

    @torch.no_grad()
    def run(self, update, keep: torch.Tensor):
        """`update()`, then everything it changed back to its value before where `keep` (0-dim bool) is False."""
        tensors = self._tensors()
        params_before = [t.clone() for t in tensors]
        optimized = self._params()
        states_before = [{k: v.clone() for k, v in opt.state.get(p, {}).items() if isinstance(v, torch.Tensor)}
                         for opt, p in optimized]
        rule_state = self.rule.live_state() if self.rule is not None else None
        rule_before = _clone_tree(rule_state)
        result = update()
        for t, old in zip(tensors, params_before):
            t.copy_(torch.where(keep.to(t.device), t, old))
        for (opt, p), old in zip(optimized, states_before):
            for k, v in opt.state.get(p, {}).items():
                if isinstance(v, torch.Tensor):
                    # state the first update created: dropped, it is what a fresh optimizer starts from
                    v.copy_(torch.where(keep.to(v.device), v, old.get(k, torch.zeros_like(v))))
        if rule_state is not None:
            _select_tree(rule_state, rule_before, keep)
        return result
