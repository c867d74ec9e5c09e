"""Grouped-Tied Attention (Zadouri, Strauss, Dao 2025): one tied key/value state per KV head.

Per token: KV = W_kv x in R^{h_kv x d} is the value, and its first d - d_R dims (never rotated) are the
key's no-RoPE part; the key's last d_R dims are K_rope = RoPE(W_kr x), one head shared by all heads.
Queries are [q_nope (d - d_R) | RoPE(q_rope) (d_R)], scale 1/sqrt(d). Under TP the KV heads are
sharded with their query heads and the RoPE key projection is replicated. The KV cache holds
h_kv*d + d_R elements per token per layer.

With `qk_norm` (common.QKNorm) the query's two parts, the key's no-RoPE part and the RoPE key are
RMS-normalised per head before RoPE; the value stays the raw KV, so the key's first d - d_R dims are
then the normalised view of the value's, and decoding normalises the cached KV's first dims at each step
(the cache layout is unchanged).

`tied=False` removes the tie (separate per-head K with its own last d_R dims rotated, and V): with
d_R = d this is exactly GQA, which tests/models/test_attention.py uses to check the wiring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from models.attention.base import AttentionConfig, Layout, check_key_value_heads
from models.attention.common import (QKNorm, apply_rope, divide, own_attention_spec, replicated,
                                     replicated_linear, rope_angles, rope_table, tp_size)
from models.config import ConfigError, ModelConfig


class GroupedTiedAttention(MegatronModule):
    """SelfAttention's contract: forward(hidden [s, b, D], attention_mask, rotary_pos_emb, ...) -> (out, bias)."""

    def __init__(self, config, submodules: dict, layer_number: int, rope_dim: int, tied: bool = True,
                 qk_norm: bool = False, attn_mask_type: AttnMaskType = AttnMaskType.causal, **_unused):
        super().__init__(config=config)
        d, n = config.kv_channels, tp_size()
        self.head_dim, self.rope_dim, self.tied = d, rope_dim, tied
        if not 0 < rope_dim <= d:
            raise ConfigError(f"attention.rope_dim={rope_dim} must be in (0, head_dim={d}]")
        self.heads = divide(config.num_attention_heads, n, "GTA query heads over tensor-parallel ranks")
        self.kv_heads = divide(config.num_query_groups, n, "GTA KV heads over tensor-parallel ranks")
        linear = dict(config=config, init_method=config.init_method, bias=False, skip_bias_add=False,
                      is_expert=False)
        col = submodules["linear_q"]
        self.linear_q = build_module(col, config.hidden_size, config.num_attention_heads * d,
                                     gather_output=False, **linear)
        kv_width = config.num_query_groups * d * (1 if tied else 2)
        self.linear_kv = build_module(col, config.hidden_size, kv_width, gather_output=False, **linear)
        # one RoPE key for all heads: replicated on every tensor-parallel rank
        self.linear_k_rope = replicated_linear(config.hidden_size, rope_dim, config) if tied else None
        eps = config.layernorm_epsilon
        self.qk_norm = QKNorm(d - rope_dim, rope_dim, eps, config.params_dtype) if qk_norm else None
        if qk_norm and not tied:
            raise ValueError("GTA's qk_norm needs the tie (tied=False exists only to check the wiring)")
        self.core_attention = build_module(submodules["core_attention"], config=config, layer_number=layer_number,
                                           attn_mask_type=attn_mask_type, softmax_scale=d ** -0.5)
        self.linear_proj = build_module(
            submodules["linear_proj"], config.num_attention_heads * d, config.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=False, input_is_parallel=True,
            skip_bias_add=True, is_expert=False)

    def qkv(self, x: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated query [s,b,h,d], the cacheable state (KV [s,b,h_kv,d], RoPE key [s,b,1,d_R]) and V."""
        s, b, _ = x.shape
        d, r = self.head_dim, self.rope_dim
        table = rope_table(table, r)
        q_nope, q_rope = self.linear_q(x)[0].view(s, b, self.heads, d).split([d - r, r], dim=-1)
        if self.qk_norm is not None:
            q_nope, q_rope = self.qk_norm.query(q_nope, q_rope)
        q = torch.cat([q_nope, apply_rope(q_rope, table)], dim=-1)
        if not self.tied:
            k, v = self.linear_kv(x)[0].view(s, b, self.kv_heads, 2 * d).split(d, dim=-1)
            return q, torch.cat([k[..., : d - r], apply_rope(k[..., d - r:], table)], dim=-1), v
        kv = self.linear_kv(x)[0].view(s, b, self.kv_heads, d)
        k_rope = self.linear_k_rope(x)
        if self.qk_norm is not None:
            k_rope = self.qk_norm.rope_key(k_rope)
        k_rope = apply_rope(replicated(k_rope).unsqueeze(2), table)
        return q, kv, k_rope

    def key_nope(self, kv: torch.Tensor) -> torch.Tensor:
        """The key's no-RoPE part of tied KV [..., h_kv, d]: its first d - d_R dims, RMS-normalised with qk_norm."""
        k = kv[..., : self.head_dim - self.rope_dim]
        return k if self.qk_norm is None else self.qk_norm.key(k)

    def tied_key(self, kv: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
        """K = [KV[..., :d - d_R] (normalised with qk_norm) | K_rope broadcast over the KV heads]."""
        shared = k_rope.expand(*kv.shape[:-1], self.rope_dim)
        return torch.cat([self.key_nope(kv), shared], dim=-1)

    def qk_weights(self) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
        """Query/key projections per head, for the stability monitor (pretrain/callbacks/stability.py) (RoPE
        rotation and QK-norm left out)."""
        d, r = self.head_dim, self.rope_dim
        w_q = self.linear_q.weight.detach()
        if not self.tied:
            w_k = self.linear_kv.weight.detach().view(self.kv_heads, 2 * d, -1)[:, :d]
        else:
            kv = self.linear_kv.weight.detach().view(self.kv_heads, d, -1)[:, : d - r]
            rope = self.linear_k_rope.weight.detach().expand(self.kv_heads, r, kv.shape[-1])
            w_k = torch.cat([kv, rope], dim=1)
        return w_q, w_k.reshape(-1, w_k.shape[-1]), self.heads, self.kv_heads, d

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                rotary_pos_emb: Optional[torch.Tensor] = None, attn_mask_type=None, **_unused):
        q, a, b = self.qkv(hidden_states, rope_angles(rotary_pos_emb, "GTA"))
        k, v = (self.tied_key(a, b), a) if self.tied else (a, b)
        out = self.core_attention(q, k, v, attention_mask, attn_mask_type=attn_mask_type)
        return self.linear_proj(out)


def gta_spec(attention, model) -> ModuleSpec:
    return own_attention_spec(GroupedTiedAttention, attention, model)


@dataclass
class GTA(AttentionConfig):
    """Grouped-tied attention: `num_query_groups` tied KV heads and one shared RoPE key of `rope_dim`."""

    type: str = "gta"
    num_query_groups: Optional[int] = None  # h_kv; None: heads // 2
    rope_dim: Optional[int] = None  # d_R, the shared RoPE key's width; None: head_dim // 2
    name = "gta"

    def sizes(self) -> tuple[str, ...]:
        return ("num_query_groups", "rope_dim")

    def query_groups(self, heads: int) -> int:
        return self.num_query_groups if self.num_query_groups is not None else max(1, heads // 2)

    def shape(self, head_dim: int) -> dict:
        return {"rope_dim": self.rope_dim or head_dim // 2}

    def spec(self, model: ModelConfig) -> ModuleSpec:
        return gta_spec(self, model)

    def check(self, model: ModelConfig, tensor_parallel: int) -> None:
        check_key_value_heads(self.query_groups(model.heads), model.heads, tensor_parallel)

    def cache_elements(self, model: ModelConfig, tensor_parallel: int = 1) -> int:
        rope = self.shape(model.kv_channels)["rope_dim"]
        return self.query_groups(model.heads) // tensor_parallel * model.kv_channels + rope

    def cache_layout(self, module: GroupedTiedAttention) -> Layout:
        if not module.tied:
            raise ValueError("decoding needs the tied GTA (tied=False exists only to check the wiring)")
        return {"kv": (module.kv_heads, module.head_dim), "k_rope": (1, module.rope_dim)}

    def decode_step(self, module: GroupedTiedAttention, x, table, cache, layer, upto, absorbed=True) -> torch.Tensor:
        from models.inference.cache import attend_cached

        q, kv, k_rope = module.qkv(x, table)
        cache.write(layer, {"kv": kv, "k_rope": k_rope})
        c = cache.read(layer, upto)
        n = module.head_dim - module.rope_dim  # key = [KV[:n] | shared RoPE key], value = KV
        # with QK-norm the key is the normalised KV[:n], no longer the value's own dims
        out = attend_cached(cache, q[..., :n], module.key_nope(c["kv"]), c["kv"], module.head_dim ** -0.5,
                            q[..., n:], c["k_rope"], tied=module.qk_norm is None)
        return module.linear_proj(out.flatten(2))[0]
