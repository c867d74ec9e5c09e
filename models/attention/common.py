"""Helpers shared by keel's own attention modules (GTA, GLA, MLA) and the KV-cache decoder.

RoPE layout (one rule for the whole project): keel's own modules put the rotated part LAST in every
head, q = [q_nope | q_rope] and k = [k_nope | k_rope], as in the papers' code. megatron's SelfAttention
(MHA/GQA/MQA) rotates all d dims of a head (rotary_percent=1), which is the same rule with d_R = d.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region


def rope_table(table: torch.Tensor, rot_dim: int) -> torch.Tensor:
    """The model's RoPE table [s, b|1, 1, d] reduced to a `rot_dim`-wide RoPE with its own frequencies.

    megatron's table is cat(f, f) with f_i = pos * base^(-2i/d); every (d/rot_dim)-th frequency is
    base^(-2j/rot_dim), exactly a rot_dim-wide RoPE, and per-document positions carry over for free.
    """
    width = table.shape[-1]
    if rot_dim == width:
        return table
    if width % rot_dim or rot_dim % 2:
        raise ValueError(f"RoPE width {rot_dim} must be even and divide the head dimension {width}")
    half = table[..., : width // 2]
    sub = half[..., :: width // rot_dim]
    return torch.cat([sub, sub], dim=-1)


def rope_angles(rotary_pos_emb, who: str) -> torch.Tensor:
    """The angle table megatron passes to self-attention (a tensor, or a (q, k) pair of one table)."""
    if rotary_pos_emb is None:
        raise ValueError(f"{who} needs model.position_embedding=rope")
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


def replicated(t: torch.Tensor) -> torch.Tensor:
    """Mark a TP-replicated tensor that feeds sharded heads: identity forward, all-reduce of its grad.

    Each rank only sees the gradient from its own heads; summing over ranks gives every rank the full
    gradient, so replicated weights stay identical and TP=N matches TP=1.
    """
    return copy_to_tensor_model_parallel_region(t)


def tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def replicated_linear(in_features: int, out_features: int, config) -> torch.nn.Linear:
    """A plain (TP-replicated) projection; megatron's checkpointing treats its weight as replicated."""
    return torch.nn.Linear(in_features, out_features, bias=False, dtype=config.params_dtype)


def divide(a: int, b: int, what: str) -> int:
    if a % b:
        raise ValueError(f"{what}: {a} is not divisible by {b}")
    return a // b


def own_attention_spec(module: type, attention, model):
    """The ModuleSpec of one of keel's own attention modules: a column-parallel query projection,
    SDPA as the core and a row-parallel output projection, with the sizes `AttentionConfig.shape` resolves."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import ModuleSpec

    from models.attention.sdpa import SDPACoreAttention

    return ModuleSpec(module=module, params=attention.shape(model.kv_channels),
                      submodules={"linear_q": ColumnParallelLinear, "core_attention": SDPACoreAttention,
                                  "linear_proj": RowParallelLinear})
