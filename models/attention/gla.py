"""Grouped Latent Attention (Zadouri, Strauss, Dao 2025); MLA is the same module with one latent.

Per token: W_dKV x = [c_1 .. c_{h_c} | k_rope]; each latent c_j (width d_c) is RMS-normalised and
up-projected to k_nope (d) and v (d) of its own g_q = h_q / h_c query heads only; k_rope (d_R, RoPE) is
one head shared by all. Queries: W_dQ -> RMSNorm -> W_uQ gives [q_nope (d) | q_rope (d_R, RoPE)] per
head (a direct projection when q_lora_rank is unset). Scale 1/sqrt(d + d_R), kept at decode.
The KV cache holds the normalised latents and the rotated RoPE key: h_c*d_c + d_R per token per layer.

With `qk_norm` (common.QKNorm) q_nope, q_rope, each head's k_nope and the shared RoPE key are also
RMS-normalised per head, before RoPE. (The latent norms above are DeepSeek's and always on; they
bound the latents, not the per-head keys W_UK c that the logits see.) The cache is unchanged, but
decoding re-expands the latents instead of absorbing W_UK into the queries (`LatentFamily.decode_step`).

Tensor parallelism: with h_c divisible by TP the latents (and their query heads) are sharded, so each
rank caches (h_c/N)*d_c + d_R. With h_c < N (MLA's single latent, or GLA-2 at TP=4) each rank keeps
the one latent its heads read (d_c + d_R, duplicated across ranks), projected up for its own heads
only. The RoPE key is always replicated. (The two layouts checkpoint the KV down-projection
differently: sharded vs replicated, so a GLA checkpoint reshards only between TP sizes of one layout.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from models.attention.base import AttentionConfig, Layout
from models.attention.common import (QKNorm, apply_rope, divide, own_attention_spec, replicated,
                                     replicated_linear, rms_norm, rope_angles, rope_table, tp_group, tp_rank,
                                     tp_size)
from models.config import ModelConfig


class LatentAttention(MegatronModule):
    """SelfAttention's contract: forward(hidden [s, b, D], attention_mask, rotary_pos_emb, ...) -> (out, bias)."""

    def __init__(self, config, submodules: dict, layer_number: int, num_latents: int, latent_dim: int,
                 rope_dim: int, q_lora_rank: Optional[int] = None, qk_norm: bool = False,
                 attn_mask_type: AttnMaskType = AttnMaskType.causal, **_unused):
        super().__init__(config=config)
        d, n, h = config.kv_channels, tp_size(), config.num_attention_heads
        self.hidden = config.hidden_size
        self.head_dim, self.rope_dim, self.latent_dim, self.eps = d, rope_dim, latent_dim, config.layernorm_epsilon
        divide(h, num_latents, "attention heads over latent heads (attention.num_latent_heads)")
        # 1. latents are sharded with their query heads when TP divides them; otherwise (MLA's single
        #    latent, or h_c < N) every rank computes all latents and keeps the one its heads read
        self.shard_latents = num_latents > 1 and num_latents % n == 0
        self.latents = num_latents // n if self.shard_latents else 1
        self.latent_index = 0 if self.shard_latents else tp_rank() // divide(
            n, num_latents, "tensor-parallel ranks over latent heads (h_c must divide TP or TP divide h_c)")
        self.num_latents = num_latents
        self.heads = divide(h, n, "query heads over tensor-parallel ranks")
        col, lin = submodules["linear_q"], dict(config=config, init_method=config.init_method, bias=False,
                                                skip_bias_add=False, is_expert=False, gather_output=False)
        # 2. query path: W_dQ -> RMSNorm -> W_uQ (or one projection)
        q_width = h * (d + rope_dim)
        if q_lora_rank:
            self.linear_q_down_proj = replicated_linear(config.hidden_size, q_lora_rank, config)
            self.q_norm_weight = torch.nn.Parameter(torch.ones(q_lora_rank, dtype=config.params_dtype))
            self.linear_q_up_proj = build_module(col, q_lora_rank, q_width, **lin)
        else:
            self.linear_q_proj = build_module(col, config.hidden_size, q_width, **lin)
        # 3. KV path: latents, their shared RMSNorm weight, the RoPE key and the per-latent up-projection
        if self.shard_latents:
            self.linear_kv_down_proj = build_module(col, config.hidden_size, num_latents * latent_dim, **lin)
        else:
            self.linear_kv_down_proj = replicated_linear(config.hidden_size, num_latents * latent_dim, config)
        self.kv_norm_weight = torch.nn.Parameter(torch.ones(latent_dim, dtype=config.params_dtype))
        self.linear_k_rope = replicated_linear(config.hidden_size, rope_dim, config)
        self.linear_kv_up_proj = build_module(col, latent_dim, h * 2 * d, **lin)
        self.qk_norm = QKNorm(d, rope_dim, self.eps, config.params_dtype) if qk_norm else None
        self.core_attention = build_module(submodules["core_attention"], config=config, layer_number=layer_number,
                                           attn_mask_type=attn_mask_type, softmax_scale=self.softmax_scale)
        self.linear_proj = build_module(
            submodules["linear_proj"], h * d, config.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=False, input_is_parallel=True,
            skip_bias_add=True, is_expert=False)

    @property
    def softmax_scale(self) -> float:
        return (self.head_dim + self.rope_dim) ** -0.5

    def queries(self, x: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q_nope [s, b, h, d] and rotated q_rope [s, b, h, d_R] of this rank's heads."""
        s, b, _ = x.shape
        if hasattr(self, "linear_q_up_proj"):
            low = rms_norm(self.linear_q_down_proj(x), self.q_norm_weight, self.eps)
            q = self.linear_q_up_proj(low)[0]
        else:
            q = self.linear_q_proj(x)[0]
        q_nope, q_rope = q.view(s, b, self.heads, -1).split([self.head_dim, self.rope_dim], dim=-1)
        if self.qk_norm is not None:
            q_nope, q_rope = self.qk_norm.query(q_nope, q_rope)
        return q_nope, apply_rope(q_rope, rope_table(table, self.rope_dim))

    def latent_kv(self, x: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache stores: normalised latents [s, b, c, d_c] and the rotated RoPE key [s, b, 1, d_R]."""
        s, b, _ = x.shape
        if self.shard_latents:
            c = self.linear_kv_down_proj(x)[0].view(s, b, self.latents, self.latent_dim)
            c = rms_norm(c, replicated(self.kv_norm_weight), self.eps)
        else:
            c = self.linear_kv_down_proj(x).view(s, b, self.num_latents, self.latent_dim)
            c = replicated(rms_norm(c, self.kv_norm_weight, self.eps))
            c = c[:, :, self.latent_index:self.latent_index + 1]
        k_rope = self.linear_k_rope(x)
        if self.qk_norm is not None:
            k_rope = self.qk_norm.rope_key(k_rope)
        k_rope = apply_rope(replicated(k_rope).unsqueeze(2), rope_table(table, self.rope_dim))
        return c, k_rope

    def up_weight(self) -> torch.Tensor:
        """This rank's up-projection as [latents, heads per latent, 2d (k_nope | v), d_c]."""
        w = self.linear_kv_up_proj.weight
        return w.view(self.latents, self.heads // self.latents, 2 * self.head_dim, self.latent_dim)

    def expand(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents -> per-head k_nope (RMS-normalised with qk_norm) and v [s, b, h, d]; latent j only feeds
        its own query heads."""
        kv = torch.einsum("sbcn,cgkn->sbcgk", c, self.up_weight()).flatten(2, 3)
        k_nope, v = kv.split(self.head_dim, dim=-1)
        return (k_nope if self.qk_norm is None else self.qk_norm.key(k_nope)), v

    def qk_weights(self) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
        """Effective per-head query/key projections of the hidden state, for the stability monitor (pretrain/callbacks/stability.py).

        Products of the down- and up-projections; the RMSNorms (QK-norm too) and the RoPE rotation are left out.
        """
        d, r, c = self.head_dim, self.rope_dim, self.latent_dim
        if hasattr(self, "linear_q_up_proj"):
            w_q = self.linear_q_up_proj.weight.detach() @ self.linear_q_down_proj.weight.detach()
        else:
            w_q = self.linear_q_proj.weight.detach()
        down = self.linear_kv_down_proj.weight.detach().view(-1, c, self.hidden)  # [h_c (local), d_c, D]
        down = down if self.shard_latents else down[self.latent_index:self.latent_index + 1]
        w_uk = self.up_weight().detach()[:, :, :d]  # [c, g, d, d_c]
        k_nope = torch.einsum("cgkn,cnD->cgkD", w_uk, down).flatten(0, 1)  # [h, d, D]
        rope = self.linear_k_rope.weight.detach().expand(k_nope.shape[0], r, k_nope.shape[-1])
        w_k = torch.cat([k_nope, rope], dim=1)
        return w_q, w_k.reshape(-1, w_k.shape[-1]), self.heads, self.heads, d + r

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                rotary_pos_emb: Optional[torch.Tensor] = None, attn_mask_type=None, **_unused):
        table = rope_angles(rotary_pos_emb, "GLA/MLA")
        q_nope, q_rope = self.queries(hidden_states, table)
        c, k_rope = self.latent_kv(hidden_states, table)
        k_nope, v = self.expand(c)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(*k_nope.shape[:-1], self.rope_dim)], dim=-1)
        out = self.core_attention(q, k, v, attention_mask, attn_mask_type=attn_mask_type)
        return self.linear_proj(out)


def latent_spec(attention, model) -> ModuleSpec:
    """GLA's spec, and MLA's: their `shape` resolves MLA to one latent of kv_lora_rank."""
    return own_attention_spec(LatentAttention, attention, model)


@dataclass
class LatentFamily(AttentionConfig):
    """What GLA and MLA share: the module, its decoupled RoPE key and query path, the cache of latents and
    the decode step (absorbed by default; re-expanded with QK-norm, see the module's docstring)."""

    qk_pos_emb_head_dim: Optional[int] = None  # d_R, the decoupled RoPE width; None: head_dim // 2
    q_lora_rank: Optional[int] = None  # query path W_dQ -> RMSNorm -> W_uQ; None: one direct projection

    def sizes(self) -> tuple[str, ...]:
        return ("qk_pos_emb_head_dim", "q_lora_rank")

    def latent_heads(self) -> int:
        raise NotImplementedError

    def latent_width(self, head_dim: int) -> int:
        raise NotImplementedError

    def query_groups(self, heads: int) -> int:
        """Unread by the latent module, but megatron checks it and checkpoints record it: heads // 2 (or 1
        for an odd head count), as every GLA/MLA run has recorded."""
        return heads // 2 if heads % 2 == 0 else 1

    def shape(self, head_dim: int) -> dict:
        return {"num_latents": self.latent_heads(), "latent_dim": self.latent_width(head_dim),
                "rope_dim": self.qk_pos_emb_head_dim or head_dim // 2, "q_lora_rank": self.q_lora_rank}

    def spec(self, model: ModelConfig) -> ModuleSpec:
        return latent_spec(self, model)

    def cache_elements(self, model: ModelConfig, tensor_parallel: int = 1) -> int:
        s = self.shape(model.kv_channels)  # MLA's one latent (h_c < TP) is kept on every rank
        return max(s["num_latents"] // tensor_parallel, 1) * s["latent_dim"] + s["rope_dim"]

    def cache_layout(self, module: LatentAttention) -> Layout:
        return {"latent": (module.latents, module.latent_dim), "k_rope": (1, module.rope_dim)}

    def decode_step(self, module: LatentAttention, x, table, cache, layer, upto, absorbed=True) -> torch.Tensor:
        from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

        from models.inference.cache import attend_cached

        q_nope, q_rope = module.queries(x, table)
        new_c, new_rope = module.latent_kv(x, table)
        cache.write(layer, {"latent": new_c, "k_rope": new_rope})
        c = cache.read(layer, upto)
        latent, k_rope = c["latent"], c["k_rope"]
        if not absorbed or module.qk_norm is not None:  # re-expand every cached latent into per-head keys, values
            k_nope, v = module.expand(latent.permute(2, 0, 1, 3))  # (normalised keys with qk_norm)
            k_nope, v = k_nope.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)
            out = attend_cached(cache, q_nope, k_nope, v, module.softmax_scale, q_rope, k_rope)
            return module.linear_proj(out.flatten(2))[0]
        # 1. queries into latent space: q~_i = W_UK,iᵀ q_nope,i for head i of latent j
        w_uk, w_o_abs = absorbed_weights(module)
        t, b = q_nope.shape[:2]
        q_nope = q_nope.view(t, b, module.latents, -1, module.head_dim)
        q_lat = torch.einsum("tbcgk,cgkn->tbcgn", q_nope, w_uk).flatten(2, 3)
        # 2. per latent a GQA-shaped attention: key [c_j | k_rope], value c_j, the training-time scale
        o = attend_cached(cache, q_lat, latent, latent, module.softmax_scale, q_rope, k_rope, tied=True)
        # 3. W_UV folded into W_O: out = sum_i (W_O,i W_UV,i) o_i, summed over ranks under TP
        out = torch.einsum("tbhn,Dhn->tbD", o, w_o_abs)
        return reduce_from_tensor_model_parallel_region(out, group=tp_group())


def absorbed_weights(attn: LatentAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """W_UK [c, g, d, d_c] and W_O absorbed with W_UV [D, h, d_c]; memoised until the weights change."""
    up_w, o_w = attn.linear_kv_up_proj.weight, attn.linear_proj.weight
    key = (up_w.data_ptr(), up_w._version, o_w.data_ptr(), o_w._version, up_w.dtype)
    memo = getattr(attn, "_keel_absorbed", None)
    if memo is None or memo[0] != key:
        up = attn.up_weight().detach()  # [c, g, 2d, d_c]
        w_uk, w_uv = up[:, :, :attn.head_dim], up[:, :, attn.head_dim:]
        w_o = o_w.detach().view(-1, attn.latents, up.shape[1], attn.head_dim)  # [D, c, g, d]
        w_o_abs = torch.einsum("Dcgk,cgkn->Dcgn", w_o.float(), w_uv.float()).flatten(1, 2).to(o_w.dtype)
        memo = (key, w_uk, w_o_abs)
        attn._keel_absorbed = memo
    return memo[1], memo[2]


@dataclass
class GLA(LatentFamily):
    """Grouped latent attention: `num_latent_heads` latents of `latent_dim`, each serving its query heads."""

    type: str = "gla"
    num_latent_heads: int = 2  # h_c
    latent_dim: Optional[int] = None  # d_c; None: 2 * head_dim
    name = "gla"

    def sizes(self) -> tuple[str, ...]:
        return (*super().sizes(), "num_latent_heads", "latent_dim")

    def latent_heads(self) -> int:
        return self.num_latent_heads

    def latent_width(self, head_dim: int) -> int:
        return self.latent_dim or 2 * head_dim
