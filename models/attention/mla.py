"""Multi-head Latent Attention (DeepSeek-V2) as keel's latent attention with ONE latent of kv_lora_rank.

Why not megatron's MLASelfAttention: it builds its own rotary embedding from the sequence length (so
per-document positions are ignored), interleaves the RoPE dims, and would need a second decode path.
MLA here is GLA with h_c = 1, d_c = kv_lora_rank (default 4d): the same code trains it and decodes it
(absorbed; re-expanded with QK-norm, see gla.py), and its cache is kv_lora_rank + d_R per token per layer,
replicated on every TP rank.
"""

from __future__ import annotations

from models.attention.gla import latent_spec

mla_spec = latent_spec  # the sizes differ (AttentionConfig.shape), the module and its decode path do not
