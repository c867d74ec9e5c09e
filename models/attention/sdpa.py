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
        dropout = self.dropout_p if self.training else 0.0
        if attention_mask is not None:
            return _merge_heads(grouped_sdpa(q, k, v, ~attention_mask, self.softmax_scale, dropout))
        mask_type = attn_mask_type or self.attn_mask_type
        causal = mask_type == AttnMaskType.causal and q.shape[2] == k.shape[2]
        out = F.scaled_dot_product_attention(  # grouped K/V read in place (flash attention takes groups)
            q, k, v, is_causal=causal, dropout_p=dropout, scale=self.softmax_scale, enable_gqa=k.shape[1] != q.shape[1])
        return _merge_heads(out)


def grouped_sdpa(q, k, v, mask, scale=None, dropout_p: float = 0.0):
    """SDPA of q [b, h, s, d] over k, v [b, hk, L, d] (hk dividing h) with a boolean mask (True attends)
    broadcastable to [b, h, s, L].

    With a mask, `enable_gqa` leaves torch only its math path (K/V expanded per query head, every
    intermediate materialised): neither its flash kernel (no masks) nor its memory-efficient one (no
    groups) takes both. Query head i reads KV head i // g, so the g query heads of a KV head become g*s
    query rows of one attention over that head's keys, which the memory-efficient kernel takes (the
    same numbers: each query row's softmax is unchanged)."""
    b, h, s, d = q.shape
    hk, length = k.shape[1], k.shape[2]
    if hk == h:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    g = h // hk
    mask = mask.expand(mask.shape[0], mask.shape[1], s, length)
    if mask.shape[1] == 1:  # one mask for every head: repeat it for the g row blocks of a KV head
        folded_mask = mask[:, :, None].expand(-1, 1, g, s, length).reshape(-1, 1, g * s, length)
    else:  # a mask per query head: its heads fold like the queries
        folded_mask = mask.expand(mask.shape[0], h, s, length).reshape(-1, hk, g * s, length)
    out = F.scaled_dot_product_attention(q.reshape(b, hk, g * s, d), k, v, attn_mask=folded_mask,
                                         dropout_p=dropout_p, scale=scale)
    return out.view(b, h, s, -1)


def _merge_heads(out):
    """[b, h, s, d] -> megatron's [s, b, h * d]."""
    b, h, s, d = out.shape
    return out.permute(2, 0, 1, 3).reshape(s, b, h * d)
