"""Document masking with FlexAttention block masks: causal attention within each packed document,
without a dense [b, 1, s, s] mask.

A dense mask costs b·s² bytes per micro-batch and sends SDPA to a kernel that reads it (and, with
grouped K/V, to the math path); a BlockMask keeps which 128×128 tiles are empty, full or partial, and
inductor generates one flash-style kernel from the mask function, skipping empty tiles. The kernel is
generated under torch.compile, so keel uses block masks inside compiled layers on a GPU (FlexAttention
has no backward on CPU); eager runs, CPU runs and the monitors' reference pass keep the dense mask.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

__all__ = ["BlockMask", "document_block_mask", "flex_attention"]


def document_block_mask(doc_ids: torch.Tensor) -> BlockMask:
    """The block mask of causal attention within each document, from per-token document ids [b, s]."""
    b, s = doc_ids.shape

    def causal_within_document(batch, head, q, kv):
        return (q >= kv) & (doc_ids[batch, q] == doc_ids[batch, kv])

    # compiled, the mask function is evaluated tile by tile rather than over all s² pairs at once
    return create_block_mask(causal_within_document, b, None, s, s, device=doc_ids.device, _compile=doc_ids.is_cuda)
