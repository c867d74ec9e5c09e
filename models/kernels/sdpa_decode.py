"""One-token decode attention for grouped K/V heads (MHA/GQA/MQA) with torch's own SDPA: the option
beside the Triton kernel where torch's kernel fits (no RoPE key, no tied or latent layout)."""

from __future__ import annotations

import torch

from models.attention.sdpa import grouped_sdpa


def sdpa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """q [b, h, e] over the first lengths[i] keys of k, v [b, hk, L, e] -> [b, h, ev].

    The length mask keeps shapes static (whole buffers) for a CUDA graph; `grouped_sdpa` makes each KV
    head's g query heads g query rows, so K/V are read once per KV head, by a kernel that takes a mask.
    """
    mask = (torch.arange(k.shape[2], device=q.device) < lengths[:, None])[:, None, None]  # [b, 1, 1, L]
    return grouped_sdpa(q[:, :, None], k, v, mask, scale)[:, :, 0]
