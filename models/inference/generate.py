"""Generation: prefill, then one token per step (from a CUDA graph on a GPU), greedy or sampled."""

from __future__ import annotations

import math

import torch

from models.attention import AttentionConfig
from models.config import ModelConfig
from models.inference.cache import new_cache
from models.inference.graph import CapturedStep
from models.inference.step import forward_cached


@torch.no_grad()
def generate(gpt, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             generator: torch.Generator | None = None, eos: int | None = None, lengths: torch.Tensor | None = None,
             graph: bool | None = None, pad: int = 0) -> torch.Tensor:
    """Continue `prompt` [b, t]: prefill once, then one token per step with the cache (greedy at T=0).

    Prompts of different lengths come right-padded with `lengths` [b]: row i's prompt is its first
    lengths[i] tokens, and its new tokens are written from there (positions and cache slots per
    sequence), so each row decodes as if alone. Stops early once every row has produced `eos`.
    `graph` (default: on CUDA) replays the one-token step from a CUDA graph.
    -> [b, t + steps]: each row's prompt, its new tokens, then `pad`.
    """
    b, t = prompt.shape
    lengths = torch.full((b,), t, device=prompt.device) if lengths is None else lengths.to(prompt.device)
    cache = new_cache(gpt, b, t + max_new_tokens)
    rows = torch.arange(b, device=prompt.device)
    logits = forward_cached(gpt, prompt, cache)[rows, lengths - 1]
    cache.lengths.copy_(lengths)  # the padding after each prompt is overwritten by its new tokens
    graph = prompt.is_cuda if graph is None else graph
    step = CapturedStep(gpt, cache) if graph else (lambda tok: forward_cached(gpt, tok, cache))
    new, done = [], torch.zeros(b, dtype=torch.bool, device=prompt.device)
    for i in range(max_new_tokens):
        nxt = sample(logits, temperature, top_k, generator)
        new.append(nxt)
        if eos is not None:
            done |= nxt == eos
            if bool(done.all()):
                break
        if i == max_new_tokens - 1:
            break
        logits = step(nxt[:, None])[:, -1]
    return _assemble(prompt, lengths, new, pad)


def right_pad(prompts: list[torch.Tensor] | list[list[int]], pad: int = 0,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> (right-padded [b, longest], lengths [b]) for `generate`."""
    rows = [torch.as_tensor(p, dtype=torch.long) for p in prompts]
    lengths = torch.tensor([len(r) for r in rows])
    if int(lengths.min()) < 1:
        raise ValueError("every prompt needs at least one token")
    padded = torch.full((len(rows), int(lengths.max())), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        padded[i, :len(r)] = r
    return padded.to(device), lengths.to(device)


def _assemble(prompt: torch.Tensor, lengths: torch.Tensor, new: list[torch.Tensor], pad: int) -> torch.Tensor:
    """Row i: its prompt's first lengths[i] tokens, its new tokens, then `pad`."""
    b, t = prompt.shape
    out = torch.full((b, t + len(new)), pad, dtype=prompt.dtype, device=prompt.device)
    out[:, :t] = prompt.masked_fill(torch.arange(t, device=prompt.device) >= lengths[:, None], pad)
    if new:
        cols = lengths[:, None] + torch.arange(len(new), device=prompt.device)
        out[torch.arange(b, device=prompt.device)[:, None], cols] = torch.stack(new, 1)
    return out


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator=None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def build_for_decode(model: ModelConfig, attention: AttentionConfig, vocab_size: int, seed: int = 1234,
                     device="cpu", dtype: torch.dtype = torch.float32):
    """The bare GPT at this world's TP size, initialised like training (no DDP), in eval mode. Without
    sequence parallelism: a decode step's one token cannot be split over TP ranks, and megatron's MoE needs
    it only to train."""
    from models.builder import build_initialised_gpt

    gpt = build_initialised_gpt(model, attention, vocab_size, seed, dtype, sequence_parallel=False)
    return gpt.to(device=device, dtype=dtype).eval()
