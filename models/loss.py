"""The language-model loss in chunks of tokens, so fp32 logits never exist for a whole micro-batch.

GPTModel's postprocess computes logits = output_layer(hidden) for every token, then megatron's
vocab-parallel cross-entropy; at vocabulary 128k and 8k tokens a micro-batch that is 4 GB of fp32
logits, kept for the backward. Here each chunk's logits are computed, turned into per-token losses by
the same `compute_language_model_loss` (megatron's vocab-parallel cross-entropy, so TP>1 stays
vocab-parallel) and dropped; activation checkpointing recomputes them chunk by chunk in the backward.
The price is one more output-layer matmul per token (2·h·V FLOPs), paid only while training.

Why not Liger's fused linear cross-entropy: it needs the full vocabulary on one rank (no TP) and Triton
(no CPU), while this path is megatron's own loss and runs, and is tested, everywhere.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _chunk_loss(hidden, labels, output_layer, output_weight, scale_logits, compute_loss, runtime_gather_output):
    logits, _ = output_layer(hidden, weight=output_weight, runtime_gather_output=runtime_gather_output)
    return compute_loss(labels, scale_logits(logits))


def chunked_loss(chunk_tokens: int, *, hidden_states, output_layer, output_weight, labels, scale_logits,
                 compute_language_model_loss, runtime_gather_output=None, config=None, **_unused) -> torch.Tensor:
    """GPTModel's `output_processor`: per-token losses [b, s] from hidden states [s, b, h] and labels [b, s],
    over chunks of about `chunk_tokens` tokens (whole sequence positions of every row).

    Under sequence parallelism each of the n TP ranks holds positions [r*s/n, (r+1)*s/n) and the output
    layer gathers its input over the ranks, so a chunk of local positions [a, a+c) is the n slices
    [r*s/n + a, r*s/n + a + c): the labels are taken, and the losses put back, slice by slice."""
    s, b, _ = hidden_states.shape
    n = config.tensor_model_parallel_size if config is not None and config.sequence_parallel else 1
    rows = max(1, chunk_tokens // (b * n))
    if rows >= s:  # one chunk: nothing to save by recomputing
        return _chunk_loss(hidden_states, labels, output_layer, output_weight, scale_logits,
                           compute_language_model_loss, runtime_gather_output)
    by_rank = labels.reshape(b, n, s)  # [b, TP rank, its positions]
    losses = []
    for start in range(0, s, rows):
        args = (hidden_states[start:start + rows], by_rank[:, :, start:start + rows].flatten(1), output_layer,
                output_weight, scale_logits, compute_language_model_loss, runtime_gather_output)
        # the output layer and the loss are deterministic: no RNG state to save and restore
        loss = (checkpoint(_chunk_loss, *args, use_reentrant=False, preserve_rng_state=False)
                if torch.is_grad_enabled() else _chunk_loss(*args))
        losses.append(loss.view(b, n, -1))
    return torch.cat(losses, dim=2).flatten(1)
