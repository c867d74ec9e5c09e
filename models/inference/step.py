"""The decode step of the whole model: each layer's attention type writes its cache and attends
(models/attention/), the rest is the model's own modules."""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

from models.attention.common import tp_group
from models.inference.cache import KVCache


def _angles(gpt, cache: KVCache, positions: torch.Tensor) -> torch.Tensor | None:
    """RoPE angles [t, b, 1, d] of positions [b, t], gathered from a table of all the cache's positions."""
    if getattr(gpt, "rotary_pos_emb", None) is None:
        return None
    if cache.angles is None:
        # [max_len, 1, d] on the cache's device (megatron computes the table where CUDA is, or on the CPU)
        cache.angles = gpt.rotary_pos_emb(cache.max_len)[:, 0].to(cache.lengths.device)
    return cache.angles[positions.T]


def forward_static(gpt, tokens: torch.Tensor, cache: KVCache, absorbed: bool = True,
                   upto: int | None = None) -> torch.Tensor:
    """forward_cached without a host sync or a bounds check: the step a CUDA graph captures.
    With upto=None every shape depends only on the buffers; lengths advance on the device."""
    b, t = tokens.shape
    positions = cache.lengths[:, None] + torch.arange(t, device=tokens.device)  # [b, t], per sequence
    h = gpt.embedding(input_ids=tokens, position_ids=positions)
    table = _angles(gpt, cache, positions)
    for i, layer in enumerate(gpt.decoder.layers):
        h = h + gpt.attention_config.decode_step(layer.self_attention, layer.input_layernorm(h), table, cache, i, upto,
                                                 absorbed)
        h = h + layer.mlp(layer.pre_mlp_layernorm(h))[0]
    if gpt.decoder.final_layernorm is not None:
        h = gpt.decoder.final_layernorm(h)
    weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else None
    logits = gather_from_tensor_model_parallel_region(gpt.output_layer(h, weight=weight)[0], group=tp_group())
    cache.lengths += t
    return logits.transpose(0, 1).float()[..., :gpt.unpadded_vocab_size]  # padded rows are never predicted


@torch.no_grad()
def forward_cached(gpt, tokens: torch.Tensor, cache: KVCache, absorbed: bool = True) -> torch.Tensor:
    """Logits [b, t, vocab] for `tokens` [b, t] following each sequence's cached ones; lengths grow by t.
    Reads only the filled part of the buffers. Under TP every rank gets the full vocabulary, so
    sampling agrees across ranks."""
    filled = int(cache.lengths.max())
    if filled + tokens.shape[1] > cache.max_len:
        raise ValueError(f"the KV cache holds {cache.max_len} tokens; {filled + tokens.shape[1]} requested")
    return forward_static(gpt, tokens, cache, absorbed, upto=filled + tokens.shape[1])


