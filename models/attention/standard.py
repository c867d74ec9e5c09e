"""MHA, GQA and MQA: megatron's own SelfAttention, which differ only in their key/value heads.

QK-norm is megatron's q_layernorm/k_layernorm slot (applied per head before RoPE), holding keel's
`HeadRMSNorm`; `megatron_qk_layernorm` makes `models.gpt.transformer_config` set the matching
`qk_layernorm`, which megatron checks against the spec and by which it sums the gains' gradients over
tensor-parallel ranks. The KV cache holds k and v: 2 * h_kv * d elements per token and layer (h_kv / TP
per rank), RoPE over all d dims.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from models.attention.base import AttentionConfig, Layout, check_key_value_heads
from models.attention.common import apply_rope
from models.config import ModelConfig


def standard_attention_spec(qk_norm: bool = False):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec

    from models.attention.common import HeadRMSNorm
    from models.attention.sdpa import SDPACoreAttention

    norm = HeadRMSNorm if qk_norm else IdentityOp
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear, core_attention=SDPACoreAttention,
            linear_proj=RowParallelLinear, q_layernorm=norm, k_layernorm=norm))


@dataclass
class StandardAttention(AttentionConfig):
    """What MHA, GQA and MQA share: the module, the rules, the cache and the decode step."""

    fused_qkv = True
    megatron_qk_layernorm = True
    llama_layout = True
    sequence_parallel = True

    def spec(self, model: ModelConfig):
        return standard_attention_spec(self.qk_norm)

    def check(self, model: ModelConfig, tensor_parallel: int) -> None:
        check_key_value_heads(self.query_groups(model.heads), model.heads, tensor_parallel)

    def cache_elements(self, model: ModelConfig, tensor_parallel: int = 1) -> int:
        return 2 * max(self.query_groups(model.heads) // tensor_parallel, 1) * model.kv_channels

    def cache_layout(self, module) -> Layout:
        shape = (module.num_query_groups_per_partition, module.hidden_size_per_attention_head)
        return {"k": shape, "v": shape}

    def decode_step(self, module, x, table, cache, layer, upto, absorbed=True) -> torch.Tensor:
        from models.inference.cache import attend_cached

        q, k, v = module.get_query_key_value_tensors(x)
        q = q.reshape(*q.shape[:2], -1, module.hidden_size_per_attention_head)
        if table is not None:  # megatron rotates all d dims (rotary_percent = 1)
            q, k = apply_rope(q, table), apply_rope(k, table)
        cache.write(layer, {"k": k, "v": v})
        c = cache.read(layer, upto)
        out = attend_cached(cache, q, c["k"], c["v"], module.hidden_size_per_attention_head ** -0.5)
        return module.linear_proj(out.flatten(2))[0]


@dataclass
class MHA(StandardAttention):
    """Multi-head attention: a key/value head per query head."""

    type: str = "mha"
    name = "mha"


@dataclass
class GQA(StandardAttention):
    """Grouped-query attention: `num_query_groups` key/value heads, each read by its group of query heads."""

    type: str = "gqa"
    num_query_groups: Optional[int] = None  # h_kv; None: heads // 2
    name = "gqa"

    def sizes(self) -> tuple[str, ...]:
        return ("num_query_groups",)

    def query_groups(self, heads: int) -> int:
        return self.num_query_groups if self.num_query_groups is not None else max(1, heads // 2)


@dataclass
class MQA(StandardAttention):
    """Multi-query attention: one key/value head for all query heads."""

    type: str = "mqa"
    name = "mqa"

    def query_groups(self, heads: int) -> int:
        return 1
