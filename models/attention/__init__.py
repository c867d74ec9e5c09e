"""Attention variants as megatron-core module specs, chosen by `attention.type`.

Every variant plugs into `TransformerLayerSubmodules.self_attention`, so switching attention is a
spec-level choice and model code never branches on it.
"""

from __future__ import annotations

from typing import Callable

from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from models.attention.sdpa import SDPACoreAttention


def standard_attention_spec() -> ModuleSpec:
    """MHA, GQA and MQA: megatron's SelfAttention; they differ only in `num_query_groups`."""
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear, core_attention=SDPACoreAttention,
            linear_proj=RowParallelLinear, q_layernorm=IdentityOp, k_layernorm=IdentityOp))


# type -> builder of the self-attention ModuleSpec. Further variants register themselves here.
ATTENTION_SPECS: dict[str, Callable[[], ModuleSpec]] = {
    "mha": standard_attention_spec,
    "gqa": standard_attention_spec,
    "mqa": standard_attention_spec,
}


def attention_spec(attention_type: str) -> ModuleSpec:
    if attention_type not in ATTENTION_SPECS:
        raise ValueError(f"attention={attention_type!r} is not available; choose one of {sorted(ATTENTION_SPECS)}")
    return ATTENTION_SPECS[attention_type]()
