"""QuacK (Anson & Aitchison 2025, arXiv 2511.21377): per-head learning rates for the query and key
weights, η_Q ∝ 1/‖W_K‖ and η_K ∝ 1/‖W_Q‖, so that one step moves the attention logits q·k by an
amount that does not grow with the weights.

megatron fuses W_q, W_k and W_v of a layer into one `linear_qkv` parameter, so the rates cannot be
parameter groups. Instead the update ΔW of that parameter is rescaled row by row after the inner
optimizer has applied it. Adam(W)'s and SGD's updates are linear in the learning rate (decoupled
weight decay included), so scaling head h's query rows of ΔW by s is exactly training them at s·η,
and the optimizer's moments are untouched.

The paper fixes the proportionality; the constants are keel's choice, with ‖·‖ the Frobenius norm
of a head's rows and ₀ the value at the first step (so training starts at the base rate):
    s_Q,h = ‖W_K,g(h)‖₀ / ‖W_K,g(h)‖                        query head h reads key head g(h)
    s_K,g = max_{h∈g} ‖W_Q,h‖₀ / max_{h∈g} ‖W_Q,h‖           key head g serves the query heads h∈g
Under GQA a key head's logit change is bounded by its largest query head, hence the max. Value rows
keep the base rate. Under tensor parallelism a rank holds whole query groups, so every norm is local.
"""

from __future__ import annotations

import torch

from models.config import ConfigError
from optim.rules.main_params import main_copy, rescale_main_copy


def qkv_layout(attention) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of megatron's fused linear_qkv on this rank."""
    if not hasattr(attention, "linear_qkv"):
        raise ConfigError(f"optim.quack needs megatron's fused linear_qkv (attention mha, gqa or mqa); "
                          f"{type(attention).__name__} has separate projections")
    return (attention.num_attention_heads_per_partition, attention.num_query_groups_per_partition,
            attention.hidden_size_per_attention_head)


def head_norms(w_qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key head g: max over its query heads of ‖W_Q,h‖, and ‖W_K,g‖ (both [kv_heads], fp32).

    Rows are grouped per query group as [its query heads, key, value] (megatron's layout)."""
    per_group = heads // kv_heads
    grouped = w_qkv.float().view(kv_heads, per_group + 2, head_dim, -1)
    q = grouped[:, :per_group].flatten(2).norm(dim=-1).amax(dim=1)
    k = grouped[:, per_group].flatten(1).norm(dim=-1)
    return q, k


def rate_factors(norms: tuple[torch.Tensor, torch.Tensor], norms0: tuple[torch.Tensor, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(s_Q of each query group's heads, s_K of each key head), both [kv_heads], from `head_norms`
    now and at the first step."""
    (q, k), (q0, k0) = norms, norms0
    return k0 / k, q0 / q


def row_scales(s_q: torch.Tensor, s_k: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """The learning-rate factor of every row of linear_qkv, [rows] (value rows: 1)."""
    kv_heads = s_k.shape[0]
    per_group = heads // kv_heads
    rows = [s_q[:, None, None].expand(kv_heads, per_group, head_dim), s_k[:, None, None].expand(kv_heads, 1, head_dim),
            torch.ones(kv_heads, 1, head_dim, device=s_k.device)]
    return torch.cat(rows, dim=1).reshape(-1)


class QuackRule:
    """An update rule (`optim.rules.UpdateRule`): after megatron's step, rescale each layer's query and key
    updates."""

    def __init__(self, megatron_optimizer, model: torch.nn.Module):
        self.optimizer = megatron_optimizer
        self.qkv = [(f"layer{layer.layer_number}", layer.self_attention.linear_qkv.weight,
                     qkv_layout(layer.self_attention)) for layer in model.decoder.layers]
        self.initial_norms: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._factors: list[torch.Tensor] = []

    @torch.no_grad()
    def step(self, inner_step):
        # 1. each head's norms before the update set this step's rates
        olds, factors = [], []
        for name, p, (heads, kv_heads, head_dim) in self.qkv:
            norms = head_norms(p, heads, kv_heads, head_dim)
            s_q, s_k = rate_factors(norms, self.initial_norms.setdefault(name, norms))
            factors.append(torch.cat([s_q, s_k]))
            olds.append((p, p.detach().clone(), main_copy(p), row_scales(s_q, s_k, heads, head_dim)))
        update_ok, grad_norm, zeros = inner_step()
        if not update_ok:
            return update_ok, grad_norm, zeros
        # 2. W = W_old + s·ΔW row by row; lerp with weight 0 (value rows) leaves W_new bit-exact
        for p, old, main_old, scale in olds:
            keep = (1.0 - scale)[:, None]
            p.data.lerp_(old, keep.expand_as(p).to(p.dtype))
            rescale_main_copy(self.optimizer, p, main_old, keep)
        self._factors += factors
        return update_ok, grad_norm, zeros

    def pop_stats(self) -> dict[str, float]:
        """The spread of the query and key rate factors since the last call."""
        if not self._factors:
            return {}
        s = torch.cat(self._factors)
        self._factors = []
        return {"quack/min_factor": float(s.min()), "quack/max_factor": float(s.max()),
                "quack/mean_factor": float(s.mean())}

    def live_state(self) -> dict:
        """The state one step changes (the first step's norms), for `optim.skip_step.UpdateGuard`."""
        return self.initial_norms

    def state_dict(self) -> dict:
        return {name: [t.clone() for t in norms] for name, norms in self.initial_norms.items()}

    def load_state_dict(self, state: dict) -> None:
        self.initial_norms = {name: tuple(norms) for name, norms in state.items()}
