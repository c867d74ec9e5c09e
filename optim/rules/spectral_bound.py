"""The spectral update bound around megatron-core's optimizer, as the trainer uses it.

megatron's optimizer owns the update: gradients go to fp32 main parameters (flat shards under the
distributed optimizer), the inner torch optimizer steps them, and the model parameters are then
refreshed (all-gathered under the distributed optimizer). The bound needs whole matrices, so it
works on the model parameters after that refresh: every rank holds its full TP-local matrix there,
and σ1 of the full (TP-sharded) matrix comes from `optim.spectral.bound_update` reducing across
the TP group. The same scale is applied to the fp32 main copy when one exists (bf16 training), so
main and model parameters stay consistent.
"""

from __future__ import annotations

import math

import torch

from optim.config import SpectralConfig
from optim.lr_rules import param_group
from optim.rules.main_params import main_copy, rescale_main_copy
from optim.spectral import bound_update, default_group_name, megatron_shard_dim


class SpectralBoundRule:
    """An update rule (`optim.rules.UpdateRule`): after megatron's step, pull each bounded matrix back to
    the bound."""

    def __init__(self, megatron_optimizer, model: torch.nn.Module, cfg: SpectralConfig, tp_group=None):
        self.optimizer, self.cfg, self.tp_group = megatron_optimizer, cfg, tp_group
        self.bounded = [(n, p) for n, p in model.named_parameters() if p.ndim >= 2 and
                        (cfg.bound_embeddings or param_group(n, p) != "embedding")]
        self.spectral_state: dict[str, dict] = {}
        self._stats: dict[str, list[float]] = {}

    @torch.no_grad()
    def step(self, inner_step):
        if math.isinf(self.cfg.tau):
            return inner_step()
        # 1. snapshot the model parameters (and separate fp32 main copies) before the update
        olds = [(n, p, p.detach().clone(), main_copy(p)) for n, p in self.bounded]
        update_ok, grad_norm, zeros = inner_step()
        if not update_ok:
            return update_ok, grad_norm, zeros
        # 2. rescale each matrix's update so that σ1(ΔW) <= τ·σ1(W_old)
        for name, p, old, main_old in olds:
            state = self.spectral_state.setdefault(name, {})
            scale = bound_update(old, p.data, state, self.cfg.tau, self.cfg.power_iters, self.tp_group,
                                 megatron_shard_dim(p) if self.tp_group is not None else None)
            rescale_main_copy(self.optimizer, p, main_old, 1.0 - scale)
            self._stats.setdefault(default_group_name(name), []).append(scale)
        return update_ok, grad_norm, zeros

    def pop_stats(self) -> dict[str, float]:
        """Per matrix group since the last call: share of matrices clipped and the mean/min scale."""
        out = {}
        for group, scales in sorted(self._stats.items()):
            s = torch.stack(scales).float()
            out[f"spectral/clip_rate/{group}"] = float((s < 1).float().mean())
            out[f"spectral/mean_scale/{group}"] = float(s.mean())
            out[f"spectral/min_scale/{group}"] = float(s.min())
        if self._stats:
            every = torch.stack([x for v in self._stats.values() for x in v]).float()
            out["spectral/clip_rate"] = float((every < 1).float().mean())
        self._stats = {}
        return out

    def live_state(self) -> dict:
        """The state one step changes (power-iteration vectors, counters), for `optim.skip_step.UpdateGuard`."""
        return self.spectral_state

    def state_dict(self) -> dict:
        keep = lambda d: {k: d[k].clone() for k in ("u", "v") if k in d}  # noqa: E731
        return {n: {"w": keep(s.get("w", {})), "dw": keep(s.get("dw", {})), "steps": int(s.get("steps", 0))}
                for n, s in self.spectral_state.items()}

    def load_state_dict(self, state: dict) -> None:
        self.spectral_state = {n: {"w": dict(s["w"]), "dw": dict(s["dw"]),
                                    "steps": torch.tensor(int(s["steps"]))} for n, s in state.items()}
