"""Multi-head Latent Attention (DeepSeek-V2) as keel's latent attention with ONE latent of kv_lora_rank.

Why not megatron's MLASelfAttention: it builds its own rotary embedding from the sequence length (so
per-document positions are ignored), interleaves the RoPE dims, and would need a second decode path.
MLA here is GLA with h_c = 1, d_c = kv_lora_rank (default 4d): the same code trains it and decodes it
(absorbed; re-expanded with QK-norm, see gla.py), and its cache is kv_lora_rank + d_R per token per layer,
replicated on every TP rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from models.attention.gla import LatentFamily


@dataclass
class MLA(LatentFamily):
    """Multi-head latent attention: one latent of `kv_lora_rank` for all query heads."""

    type: str = "mla"
    kv_lora_rank: Optional[int] = None  # d_c; None: 4 * head_dim
    name = "mla"

    def sizes(self) -> tuple[str, ...]:
        return (*super().sizes(), "kv_lora_rank")

    def latent_heads(self) -> int:
        return 1

    def latent_width(self, head_dim: int) -> int:
        return self.kv_lora_rank or 4 * head_dim
