"""Attention variants as megatron-core module specs, chosen by `attention.type`.

Every variant plugs into `TransformerLayerSubmodules.self_attention`, so switching attention is a
spec-level choice and model code never branches on it.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from models.attention.common import HeadRMSNorm
from models.attention.gla import latent_spec
from models.attention.gta import gta_spec
from models.attention.mla import mla_spec
from models.attention.sdpa import SDPACoreAttention
from models.config import AttentionConfig, ModelConfig


def standard_attention_spec(attention: Optional[AttentionConfig], model: Optional[ModelConfig]) -> ModuleSpec:
    """MHA, GQA and MQA: megatron's SelfAttention; they differ only in `num_query_groups`. QK-norm is
    megatron's own q_layernorm/k_layernorm slot (applied per head before RoPE), holding keel's RMSNorm;
    `models.gpt.transformer_config` sets the matching `qk_layernorm`, which megatron checks against the spec."""
    norm = HeadRMSNorm if attention is not None and attention.qk_norm else IdentityOp
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear, core_attention=SDPACoreAttention,
            linear_proj=RowParallelLinear, q_layernorm=norm, k_layernorm=norm))


# type -> builder(attention config, model config) of the self-attention ModuleSpec.
ATTENTION_SPECS: dict[str, Callable[[AttentionConfig, Optional[ModelConfig]], ModuleSpec]] = {
    "mha": standard_attention_spec,
    "gqa": standard_attention_spec,
    "mqa": standard_attention_spec,
    "gta": gta_spec,
    "gla": latent_spec,
    "mla": mla_spec,
}


def attention_spec(attention: Union[AttentionConfig, str], model: Optional[ModelConfig] = None) -> ModuleSpec:
    """The spec for `attention` (a config, or just a type with default options); GTA/GLA/MLA need `model`."""
    attention = AttentionConfig(type=attention) if isinstance(attention, str) else attention
    if attention.type not in ATTENTION_SPECS:
        raise ValueError(f"attention={attention.type!r} is not available; choose one of {sorted(ATTENTION_SPECS)}")
    if model is None and attention.type in ("gta", "gla", "mla"):
        raise ValueError(f"attention={attention.type} needs the model config (head dimension) to build its spec")
    return ATTENTION_SPECS[attention.type](attention, model)
