"""Spectral-norm update bound (AdamW², Qi et al., ICLR 2025, arXiv 2505.21910).

For every bounded matrix W the wrapped optimizer proposes ΔW_t (after its own normalisation, LR and
decoupled weight decay).  Where σ1(ΔW_t)/σ1(W_{t-1}) > τ the step is rescaled so that
σ1(s·ΔW_t) = τ·σ1(W_{t-1}); by Weyl's inequality σ1(W_t) <= (1+τ)·σ1(W_{t-1}) (weight decay off).

Choices the paper leaves open (documented defaults, all constructor arguments):
  * tau = 0.05 (DEFAULT_TAU): not published; the paper ablates it -- ablate per model.
  * power_iters = 3 per quantity per step with persistent, warm-started u/v (spectral-norm-layer trick).
  * safety = 1.05: power iteration returns a LOWER bound on σ1, so σ̂(ΔW) is inflated by this factor.
    The bound is then exact whenever σ̂(ΔW) >= σ1(ΔW)/safety.  Under-estimating σ1(W_old) only makes
    the bound stricter, so no factor is applied there.  Measured (AdamW lr 1e-2 on a 64-128-64 MLP,
    steps 10-200, σ̂(ΔW)/σ1(ΔW)): 2 iters median 0.998, 1% quantile 0.93, worst 0.64; 3 iters median
    0.999, 1% quantile 0.95, worst 0.75; 4 iters 1% quantile 0.96, worst 0.94.  Adam updates have a flat
    spectrum, so rare steps overshoot the bound by up to ~1/(worst·safety); raise power_iters to tighten.
    Cost: 2·power_iters mat-vecs per quantity (W and ΔW) per bounded matrix per step, in fp32.
  * sigma_floor = 1e-2: σ1(W_old) is clamped below by this, so a zero-initialised matrix may take a
    first step of σ1 <= τ·floor and then grow geometrically, instead of being frozen at zero.  Normal
    inits (std 0.02, d >= 256 gives σ1 >= 0.6) never touch the floor.

One power-iteration implementation lives here (the stability monitors in pretrain/callbacks/ import it).  It supports
tensor-parallel shards: with `shard_dim` 0 (rows split) or 1 (columns split) and a process `group`,
partial products are all-reduced (sum) so σ1 is that of the FULL matrix (shards must be equal-sized,
as in megatron-core TP).  With megatron's distributed optimizer (flat DP shards of main params) the
caller must hand bound_update whole (TP-local) matrices; flat DP shards are not supported here.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_TAU = 0.05
DEFAULT_POWER_ITERS = 3
DEFAULT_SAFETY = 1.05
DEFAULT_SIGMA_FLOOR = 1e-2
_TINY = 1e-30  # below this a vector norm counts as zero: keep the previous direction instead
_INIT_SEED = 1234  # fixed so every TP rank (and a resumed run) builds the same start vectors

ParamSelector = Iterable[Tensor] | Callable[[str, Tensor], bool] | None


# ----------------------------------------------------------------------------------------------
# Power iteration (the single implementation)
# ----------------------------------------------------------------------------------------------

def _tp_sum(x: Tensor, group: Any, active: bool) -> Tensor:
    """Sum partial products over the TP group (only where this quantity is split across ranks)."""
    if active and group is not None and dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def _normalize(x: Tensor, prev: Tensor, group: Any, sharded: bool) -> tuple[Tensor, Tensor]:
    """Unit vector(s) along the last dim and their norms; a zero vector keeps `prev` (no NaN, no sync)."""
    norm = _tp_sum(x.square().sum(-1, keepdim=True), group, sharded).sqrt()
    unit = torch.where(norm > _TINY, x / norm.clamp_min(_TINY), prev)
    return unit, norm.squeeze(-1)


def power_iteration_op(
    matvec: Callable[[Tensor], Tensor],
    rmatvec: Callable[[Tensor], Tensor],
    u: Tensor,
    v: Tensor,
    iters: int,
    group: Any = None,
    shard_dim: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """σ1 of the operator A (given by A·v and Aᵀ·u) by `iters` rounds of power iteration.

    Batched over leading dims of u/v.  Returns (sigma, u, v); sigma = ||Aᵀu|| with ||u|| = 1 is a lower
    bound on σ1.  shard_dim=0: A's rows (and u) are split over `group`; shard_dim=1: columns (and v).
    """
    if iters < 1:
        raise ValueError("power iteration needs iters >= 1")
    u_split, v_split = shard_dim == 0, shard_dim == 1
    sigma = torch.zeros(u.shape[:-1], dtype=u.dtype, device=u.device)
    for _ in range(iters):
        # 1. u <- A v: with split columns each rank holds a partial sum of the full u
        u, _ = _normalize(_tp_sum(matvec(v), group, v_split), u, group, u_split)
        # 2. v <- Aᵀ u: with split rows each rank holds a partial sum of the full v
        v, sigma = _normalize(_tp_sum(rmatvec(u), group, u_split), v, group, v_split)
    return sigma, u, v


def _tp_rank_world(group: Any) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def init_vectors(
    shape: Sequence[int], device: torch.device | str, group: Any = None, shard_dim: int | None = None
) -> tuple[Tensor, Tensor]:
    """Deterministic unit start vectors (u [..., m], v [..., n]) for a local operator of `shape`
    [..., m, n]; a TP shard gets its slice of the full vector (equal-sized shards assumed)."""
    rank, world = _tp_rank_world(group if shard_dim is not None else None)
    *batch, m, n = shape
    gen = torch.Generator().manual_seed(_INIT_SEED)
    vecs = []
    for size, dim in ((m, 0), (n, 1)):
        full = size * world if shard_dim == dim else size
        vec = torch.randn(*batch, full, generator=gen)
        vec = vec / vec.norm(dim=-1, keepdim=True)
        if shard_dim == dim:
            vec = vec[..., rank * size:(rank + 1) * size]
        vecs.append(vec.to(device=device, dtype=torch.float32).contiguous())
    return vecs[0], vecs[1]


def power_iteration(
    w: Tensor, state: dict, iters: int, group: Any = None, shard_dim: int | None = None
) -> Tensor:
    """σ1 estimate of w [..., m, n] (fp32), warm-started from and written back to state['u'], state['v']."""
    wf = w.float()
    if state.get("u") is None or state["u"].shape != (*w.shape[:-2], w.shape[-2]):
        state["u"], state["v"] = init_vectors(w.shape, w.device, group, shard_dim)
    sigma, state["u"], state["v"] = power_iteration_op(
        lambda v: (wf @ v.unsqueeze(-1)).squeeze(-1),
        lambda u: (u.unsqueeze(-2) @ wf).squeeze(-2),
        state["u"], state["v"], iters, group, shard_dim,
    )
    return sigma


# ----------------------------------------------------------------------------------------------
# The bound itself (reusable where megatron-core owns the parameters)
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def bound_update(
    w_old: Tensor,
    w_new: Tensor,
    state: dict,
    tau: float,
    power_iters: int = DEFAULT_POWER_ITERS,
    group: Any = None,
    shard_dim: int | None = None,
    safety: float = DEFAULT_SAFETY,
    sigma_floor: float = DEFAULT_SIGMA_FLOOR,
) -> Tensor:
    """Rescale the step w_old -> w_new in place so σ1(ΔW) <= τ·σ1(w_old); returns the scale (0-dim).

    `state` holds this matrix's warm-start vectors ('w', 'dw' sub-dicts) plus the last 'sigma_w' and
    'ratio' (σ̂1(ΔW)/σ̂1(W), before the safety factor) for monitoring.  No host sync happens here.
    """
    # 1. σ1 of the previous weights (an under-estimate, which only tightens the bound)
    sigma_w = power_iteration(w_old, state.setdefault("w", {}), power_iters, group, shard_dim)
    # 2. σ1 of the proposed update, inflated by `safety` against power iteration's under-estimate
    delta = w_new.float() - w_old.float()
    sigma_dw = power_iteration(delta, state.setdefault("dw", {}), power_iters, group, shard_dim)
    del delta
    denom = sigma_w.clamp_min(sigma_floor)
    # 3. s = τ·σ1(W_old)/σ1(ΔW) where the ratio exceeds τ (paper's lr_eff = lr·s), else 1
    scale = torch.nan_to_num((tau * denom / (safety * sigma_dw)).clamp(max=1.0), nan=1.0)
    # 4. W = W_old + s·ΔW = lerp(W_new, W_old, 1-s); weight 0 leaves W_new bit-exact
    w_new.lerp_(w_old, 1.0 - scale)
    state["sigma_w"], state["ratio"] = sigma_w, sigma_dw / denom
    # a device counter: a step dropped on the device (optim.skip_step) restores it without a host sync
    state["steps"] = state.get("steps", torch.zeros((), dtype=torch.int64, device=w_old.device)) + 1
    return scale


# ----------------------------------------------------------------------------------------------
# Optimizer wrapper
# ----------------------------------------------------------------------------------------------

def default_group_name(name: str) -> str:
    """Group matrices by their module+parameter suffix, e.g. '...layers.3.mlp.linear_fc1.weight'
    -> 'linear_fc1.weight', so logging aggregates over layers."""
    return ".".join(name.split(".")[-2:])


def matrix_params(exclude: Iterable[str] = ()) -> Callable[[str, Tensor], bool]:
    """Selector: every parameter with ndim >= 2 whose name contains none of `exclude`
    (e.g. ('embedding', 'output_layer') to leave embeddings unbounded)."""
    words = tuple(exclude)
    return lambda name, p: p.ndim >= 2 and not any(wd in name for wd in words)


def megatron_shard_dim(p: Tensor) -> int | None:
    """TP split dim from megatron-core's parameter attributes (also copied onto fp32 main params)."""
    return getattr(p, "partition_dim", None) if getattr(p, "tensor_model_parallel", False) else None


_HOOK_DICTS = (
    "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks",
)


class SpectralBound(torch.optim.Optimizer):
    """Wrap any "propose then apply" torch optimizer (AdamW, SGD+momentum, ...) with the spectral bound.

    param_groups and state ARE the inner optimizer's (so LR schedulers drive the inner LR).  Bounded
    parameters are chosen once at construction (and for groups added later via add_param_group).  A
    bounded parameter is snapshotted only if it has a grad (or a closure is passed), since torch
    optimizers leave grad-less parameters untouched.  Costs one copy of the bounded parameters.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        tau: float = DEFAULT_TAU,
        power_iters: int = DEFAULT_POWER_ITERS,
        params: ParamSelector = None,
        names: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]] | None = None,
        group_fn: Callable[[str], str] | None = None,
        tp_group: Any = None,
        shard_dim_fn: Callable[[Tensor], int | None] = megatron_shard_dim,
        safety: float = DEFAULT_SAFETY,
        sigma_floor: float = DEFAULT_SIGMA_FLOOR,
    ) -> None:
        # Optimizer.__init__ is skipped on purpose: it would create a second set of param_groups.
        self.optimizer, self.defaults = optimizer, optimizer.defaults
        for attr in _HOOK_DICTS:
            setattr(self, attr, OrderedDict())
        self._patch_step_function()
        self.tau, self.power_iters, self.safety, self.sigma_floor = tau, power_iters, safety, sigma_floor
        self.tp_group, self._shard_dim_fn = tp_group, shard_dim_fn
        pairs = names.items() if isinstance(names, Mapping) else (names or ())
        self._names = {id(p): n for n, p in pairs}
        self._has_names = names is not None
        self._group_fn = group_fn or default_group_name
        self._selector = params if callable(params) or params is None else {id(p) for p in params}
        self.spectral_state: dict[int, dict] = {}
        self._stats: dict[str, dict[str, Any]] = {}
        self._refresh()

    # -- delegation ---------------------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        self._refresh()

    def __repr__(self) -> str:
        return f"SpectralBound(tau={self.tau}, power_iters={self.power_iters}, {self.optimizer!r})"

    # -- selection ----------------------------------------------------------------------------
    def _all_params(self) -> list[Tensor]:
        """Flat parameter order == the index order of torch's optimizer state_dict."""
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _selected(self, p: Tensor) -> bool:
        if self._selector is None:
            return p.ndim >= 2
        if callable(self._selector):
            return bool(self._selector(self._names.get(id(p), ""), p))
        return id(p) in self._selector

    def _group_of(self, p: Tensor) -> str:
        if not self._has_names:
            return "all"
        name = self._names.get(id(p))
        return self._group_fn(name) if name is not None else "other"

    def _refresh(self) -> None:
        self._bounded = [(i, p, self._group_of(p)) for i, p in enumerate(self._all_params())
                         if self._selected(p)]

    # -- step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        # τ = ∞: no snapshot, no power iteration -> bit-for-bit the bare optimizer
        # (torch optimizers run a closure under enable_grad themselves)
        if math.isinf(self.tau):
            return self.optimizer.step(closure)
        # 1. snapshot W_old (a closure may create grads later, so then snapshot everything)
        olds = [(i, p, grp, p.detach().clone()) for i, p, grp in self._bounded
                if closure is not None or p.grad is not None]
        # 2. the inner optimizer proposes and applies its update
        loss = self.optimizer.step(closure)
        # 3. pull each bounded matrix back onto the spectral ball around W_old
        for i, p, grp, old in olds:
            st = self.spectral_state.setdefault(i, {})
            scale = bound_update(old, p.data, st, self.tau, self.power_iters, self.tp_group,
                                 self._shard_dim_fn(p) if self.tp_group is not None else None,
                                 self.safety, self.sigma_floor)
            self._record(grp, scale, st["ratio"])
        return loss

    # -- logging ------------------------------------------------------------------------------
    def _record(self, group: str, scale: Tensor, ratio: Tensor) -> None:
        """Accumulate on device; the host sync happens only in pop_stats."""
        acc = self._stats.get(group)
        if acc is None:
            self._stats[group] = {"n": 1, "clipped": (scale < 1).float(), "sum": scale.clone(),
                                  "min": scale.clone(), "ratio": ratio.clone()}
            return
        acc["n"] += 1
        acc["clipped"] += (scale < 1).float()
        acc["sum"] += scale
        acc["min"] = torch.minimum(acc["min"], scale)
        acc["ratio"] = torch.maximum(acc["ratio"], ratio)

    def pop_stats(self) -> dict[str, float]:
        """Per group since the last call: matrix-steps bounded, clipped count and rate, mean/min scale,
        max σ̂1(ΔW)/σ̂1(W).  Resets the counters."""
        out: dict[str, float] = {}
        for grp, acc in sorted(self._stats.items()):
            n, clipped = acc["n"], float(acc["clipped"])
            out[f"spectral/bounded/{grp}"] = float(n)
            out[f"spectral/clipped/{grp}"] = clipped
            out[f"spectral/clip_rate/{grp}"] = clipped / n
            out[f"spectral/mean_scale/{grp}"] = float(acc["sum"]) / n
            out[f"spectral/min_scale/{grp}"] = float(acc["min"])
            out[f"spectral/max_ratio/{grp}"] = float(acc["ratio"])
        self._stats = {}
        return out

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        vec = lambda d: {k: d[k] for k in ("u", "v") if k in d}  # noqa: E731
        spectral = {i: {"w": vec(s.get("w", {})), "dw": vec(s.get("dw", {})),
                        "steps": int(s.get("steps", 0))} for i, s in self.spectral_state.items()}
        return {"inner": self.optimizer.state_dict(),
                "spectral": {"tau": self.tau, "power_iters": self.power_iters, "state": spectral}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        self.optimizer.load_state_dict(state_dict["inner"])
        params = self._all_params()
        self.spectral_state = {}
        for i, s in state_dict["spectral"]["state"].items():
            dev = params[int(i)].device
            self.spectral_state[int(i)] = {
                q: {k: t.detach().to(dev, torch.float32).clone() for k, t in s[q].items()}
                for q in ("w", "dw")} | {"steps": int(s["steps"])}
