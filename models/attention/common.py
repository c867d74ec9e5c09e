"""Helpers shared by keel's own attention modules (GTA, GLA, MLA) and the KV-cache decoder.

RoPE layout (one rule for the whole project): keel's own modules put the rotated part LAST in every
head, q = [q_nope | q_rope] and k = [k_nope | k_rope], as in the papers' code. megatron's SelfAttention
(MHA/GQA/MQA) rotates all d dims of a head (rotary_percent=1), which is the same rule with d_R = d.

QK-norm (`attention.qk_norm`): RMSNorm per head of queries and keys before RoPE and the dot product,
one gain per normalised part shared by all heads, computed in fp32. megatron's SelfAttention takes it
as its q_layernorm/k_layernorm submodules (`HeadRMSNorm`, over all d dims); keel's own modules use
`QKNorm`, which normalises the content part and the RoPE part of each head apart (its docstring says why).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

from models.config import ConfigError


def rope_table(table: torch.Tensor, rot_dim: int) -> torch.Tensor:
    """The model's RoPE table [s, b|1, 1, d] reduced to a `rot_dim`-wide RoPE with its own frequencies.

    megatron's table is cat(f, f) with f_i = pos * base^(-2i/d); every (d/rot_dim)-th frequency is
    base^(-2j/rot_dim), exactly a rot_dim-wide RoPE, and per-document positions carry over for free.
    """
    width = table.shape[-1]
    if rot_dim == width:
        return table
    if width % rot_dim or rot_dim % 2:
        raise ConfigError(f"RoPE width {rot_dim} must be even and divide the head dimension {width}")
    half = table[..., : width // 2]
    sub = half[..., :: width // rot_dim]
    return torch.cat([sub, sub], dim=-1)


def rope_angles(rotary_pos_emb, who: str) -> torch.Tensor:
    """The angle table megatron passes to self-attention (a tensor, or a (q, k) pair of one table)."""
    if rotary_pos_emb is None:
        raise ConfigError(f"{who} needs model.position_embedding=rope")
    return rotary_pos_emb[0] if isinstance(rotary_pos_emb, tuple) else rotary_pos_emb


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate all of x's last dim (width = table width) by megatron's rotate-half convention.

    x: [s, b, heads, r]; table: [s, b|1, 1, r] of angles.
    """
    cos, sin = table.cos().to(x.dtype), table.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in fp32 like megatron's norms."""
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (out * weight.float()).to(x.dtype)


class HeadRMSNorm(torch.nn.Module):
    """QK-norm for megatron's SelfAttention: RMSNorm over each head's d dims of [s, b, heads, d], one gain
    shared by all heads (its q_layernorm/k_layernorm submodule, built as megatron builds those). Under TP
    each rank normalises its own heads; megatron's finalize_model_grads sums the gains' gradients over the
    ranks (it does so for parameters named q_layernorm/k_layernorm when config.qk_layernorm is set)."""

    def __init__(self, hidden_size: int, config, eps: float = 1e-5, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class QKNorm(torch.nn.Module):
    """QK-norm for keel's own modules (GTA, GLA, MLA), whose logit is a content term q_nope·k_nope plus a
    RoPE term q_rope·k_rope against ONE RoPE key shared by all heads. Each of the four parts gets an
    RMSNorm per head with its own gain (shared by the heads), before RoPE.

    Why the parts apart rather than each whole head: the shared RoPE key is then normalised once per
    token, by itself, so the cache keeps it as it is (normalised and rotated) and decoding reads it
    unchanged; a norm over [k_nope_i | k_rope] would tie it to every head's content key. Each term stays
    bounded (|q·k| <= width x gain product), which is what QK-norm is for. The content key needs the
    per-head key in full: GTA normalises the cached value's first d - d_R dims at each step, and GLA/MLA
    can no longer fold W_UK into the query (1/rms(W_UK,i c_j) is a per-head, per-token factor), so they
    decode with the latents re-expanded (`LatentFamily.decode_step` in gla.py).

    Under TP the heads are sharded and the gains replicated: `query` and `key` mark the gains
    `replicated` (their gradients summed over ranks); `rope_key` acts on the RoPE key that every rank
    computes whole, before the caller marks that key `replicated`.
    """

    def __init__(self, nope: int, rope: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        for name, width in (("q_nope", nope), ("q_rope", rope), ("k_nope", nope), ("k_rope", rope)):
            self.register_parameter(f"{name}_weight", torch.nn.Parameter(torch.ones(width, dtype=dtype)))

    def query(self, q_nope: torch.Tensor, q_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (rms_norm(q_nope, replicated(self.q_nope_weight), self.eps),
                rms_norm(q_rope, replicated(self.q_rope_weight), self.eps))

    def key(self, k_nope: torch.Tensor) -> torch.Tensor:
        return rms_norm(k_nope, replicated(self.k_nope_weight), self.eps)

    def rope_key(self, k_rope: torch.Tensor) -> torch.Tensor:
        return rms_norm(k_rope, self.k_rope_weight, self.eps)


def replicated(t: torch.Tensor) -> torch.Tensor:
    """Mark a TP-replicated tensor that feeds sharded heads: identity forward, all-reduce of its grad.

    Each rank only sees the gradient from its own heads; summing over ranks gives every rank the full
    gradient, so replicated weights stay identical and TP=N matches TP=1.
    """
    return copy_to_tensor_model_parallel_region(t, group=tp_group())


def tp_group():
    """The tensor-parallel group, passed explicitly to megatron's mappings: without it they look the group up
    through a deprecation `warnings.warn` that torch.compile cannot trace (a graph break per call)."""
    return parallel_state.get_tensor_model_parallel_group()


def tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def replicated_linear(in_features: int, out_features: int, config) -> torch.nn.Linear:
    """A plain (TP-replicated) projection; megatron's checkpointing treats its weight as replicated."""
    return torch.nn.Linear(in_features, out_features, bias=False, dtype=config.params_dtype)


def divide(a: int, b: int, what: str) -> int:
    if a % b:
        raise ConfigError(f"{what}: {a} is not divisible by {b}")
    return a // b


def own_attention_spec(module: type, attention, model):
    """The ModuleSpec of one of keel's own attention modules: a column-parallel query projection,
    SDPA as the core and a row-parallel output projection, with the sizes `AttentionConfig.shape` resolves
    and QK-norm on or off."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import ModuleSpec

    from models.attention.sdpa import SDPACoreAttention

    return ModuleSpec(module=module, params={**attention.shape(model.kv_channels), "qk_norm": attention.qk_norm},
                      submodules={"linear_q": ColumnParallelLinear, "core_attention": SDPACoreAttention,
                                  "linear_proj": RowParallelLinear})
