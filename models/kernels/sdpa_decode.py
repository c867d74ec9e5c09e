"""One-token decode attention for grouped K/V heads (MHA/GQA/MQA) with torch's own SDPA: the option
beside the Triton kernel where torch's kernel fits (no RoPE key, no tied or latent layout)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sdpa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """q [b, h, e] over the first lengths[i] keys of k, v [b, hk, L, e] -> [b, h, ev].

    enable_gqa lets SDPA read each KV head for its g query heads without expanding K/V; the length mask
    keeps shapes static (whole buffers) for a CUDA graph, at the price of SDPA's masked kernels.
    """
    mask = (torch.arange(k.shape[2], device=q.device) < lengths[:, None])[:, None, None]  # [b, 1, 1, L]
    return F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, scale=scale, enable_gqa=True)[:, :, 0]
