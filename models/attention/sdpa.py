"""Core attention on torch's scaled_dot_product_attention, so CPU and GPU share one code path."""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from models.attention.flex import BlockMask, flex_attention


class SDPACoreAttention(MegatronModule):
    """Drop-in for megatron's DotProductAttention (same constructor and forward signature).

    Inputs are megatron's [seq, batch, heads, dim]; keys/values may have fewer heads (GQA).
    ``attention_mask`` follows megatron's convention: True marks a position that is masked out.
    Without a mask, causal attention uses SDPA's fused causal path.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str = "self", attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None, **_unused):
        super().__init__(config=config)
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **_unused):
        assert packed_seq_params is None, "packed THD sequences need TransformerEngine; keel masks documents instead"
        # 1. [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if isinstance(attention_mask, BlockMask):  # documents, as FlexAttention tiles (models/attention/flex.py)
            assert not (self.training and self.dropout_p), "FlexAttention applies no attention dropout"
            out = flex_attention(q, k, v, block_mask=attention_mask, scale=self.softmax_scale,
                                 enable_gqa=k.shape[1] != q.shape[1])
            return _merge_heads(out)
        # 2. mask: megatron's True-is-masked becomes SDPA's True-attends
        mask_type = attn_mask_type or self.attn_mask_type
        causal = mask_type == AttnMaskType.causal and attention_mask is None and q.shape[2] == k.shape[2]
        sdpa_mask = None if attention_mask is None else ~attention_mask
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=sdpa_mask, is_causal=causal,
            dropout_p=self.dropout_p if self.training else 0.0, scale=self.softmax_scale,
            enable_gqa=k.shape[1] != q.shape[1])  # grouped K/V read in place, never copied per query head
        return _merge_heads(out)


def _merge_heads(out):
    """[b, h, s, d] -> megatron's [s, b, h * d]."""
    b, h, s, d = out.shape
    return out.permute(2, 0, 1, 3).reshape(s, b, h * d)
