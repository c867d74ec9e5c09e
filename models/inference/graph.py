"""The one-token decode step recorded in a CUDA graph."""

from __future__ import annotations

import torch

from models.inference.cache import KVCache
from models.inference.step import forward_static


class CapturedStep:
    """The one-token step over whole buffers, recorded once in a CUDA graph and replayed per token, so a
    step costs no Python and no per-kernel launches. The logits it returns are the graph's own buffer,
    overwritten by the next call. The cache's lengths are unchanged by the capture."""

    def __init__(self, gpt, cache: KVCache, absorbed: bool = True, warmup: int = 2):
        self.cache, self.filled = cache, int(cache.lengths.max())
        self.tokens = torch.zeros(cache.lengths.shape[0], 1, dtype=torch.long, device=cache.lengths.device)
        saved = cache.lengths.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(warmup):  # compiles the kernels and fills the memos outside the graph
                forward_static(gpt, self.tokens, cache, absorbed)
                cache.lengths.copy_(saved)  # the scratch token written at lengths is overwritten later
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.logits = forward_static(gpt, self.tokens, cache, absorbed)
        cache.lengths.copy_(saved)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.filled + 1 > self.cache.max_len:
            raise ValueError(f"the KV cache holds {self.cache.max_len} tokens; {self.filled + 1} requested")
        self.tokens.copy_(tokens)
        self.graph.replay()
        self.filled += 1
        return self.logits
