"""The KV cache, and the attention over it that every attention type's decode step calls: the PyTorch
path (`attend`, the CPU path and the reference) or, for one-token steps, the cache's kernel."""

from __future__ import annotations

from typing import Literal

import torch

from models.attention import Layout

Kernel = Literal["triton", "sdpa"] | None
KERNELS = (None, "triton", "sdpa")


class KVCache:
    """Preallocated per-layer cache tensors and, per sequence, the number of tokens filled.

    Each tensor of per-token shape (heads, e) is stored head-major, [batch, heads, max_len, e], so the
    cached keys of one head are one contiguous matrix that attention reads in place. `lengths` [batch]
    lives on the device: a step reads and advances it without a host sync, so the one-token step has
    static shapes and can be captured in a CUDA graph (`CapturedStep`), and sequences of a batch may
    hold different lengths (prompts of different lengths). `kernel` picks how one-token steps attend:
    None, the PyTorch `attend` (the CPU path and the reference); "triton", the split-K kernel of
    models/kernels/decode.py for every layout; "sdpa", torch's SDPA for MHA/GQA/MQA and the Triton
    kernel for the layouts SDPA does not fit (GTA, GLA, MLA).
    """

    def __init__(self, layouts: list[Layout], batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", kernel: Kernel = None):
        if kernel not in KERNELS:
            raise ValueError(f"decode kernel {kernel!r}: one of {KERNELS}")
        self.layouts, self.max_len, self.kernel = layouts, max_len, kernel
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.layers = [{name: torch.zeros(batch, heads, max_len, e, dtype=dtype, device=device)
                        for name, (heads, e) in layout.items()} for layout in layouts]
        self.angles: torch.Tensor | None = None  # the RoPE table of all max_len positions, made on first use

    @property
    def length(self) -> int:
        """Tokens filled when every sequence holds the same number (reads the device)."""
        lo, hi = int(self.lengths.min()), int(self.lengths.max())
        if lo != hi:
            raise ValueError(f"the sequences hold {lo}..{hi} tokens; read `lengths`")
        return hi

    @length.setter
    def length(self, n: int) -> None:
        self.lengths.fill_(n)

    def write(self, layer: int, new: dict[str, torch.Tensor]) -> None:
        """Write `new` ([t, b, heads, e] each) at positions lengths[i].. of each sequence i."""
        t, b = next(iter(new.values())).shape[:2]
        rows = torch.arange(b, device=self.lengths.device)[:, None]
        cols = self.lengths[:, None] + torch.arange(t, device=self.lengths.device)  # [b, t]
        for name, value in new.items():
            buf = self.layers[layer][name]
            buf[rows, :, cols] = value.transpose(0, 1).to(buf.dtype)  # index [b, t] -> [b, t, heads, e]

    def read(self, layer: int, upto: int | None) -> dict[str, torch.Tensor]:
        """The cached [b, heads, L, e]: the first `upto` positions, or the whole buffers (static shapes)."""
        return {name: buf if upto is None else buf[:, :, :upto] for name, buf in self.layers[layer].items()}

    def elements_per_token(self, layer: int = 0) -> int:
        """Measured on the allocated tensors: elements per token per layer."""
        return sum(buf[0, :, 0].numel() for buf in self.layers[layer].values())

    def bytes_per_token(self, layer: int = 0) -> int:
        return sum(buf[0, :, 0].numel() * buf.element_size() for buf in self.layers[layer].values())


def new_cache(gpt, batch: int, max_len: int, dtype: torch.dtype | None = None,
              kernel: Kernel | Literal["auto"] = "auto") -> KVCache:
    """The model's cache; kernel "auto": the Triton kernel on CUDA, the PyTorch path elsewhere."""
    p = next(gpt.parameters())
    layouts = [gpt.attention_config.cache_layout(layer.self_attention) for layer in gpt.decoder.layers]
    kernel = ("triton" if p.device.type == "cuda" else None) if kernel == "auto" else kernel
    return KVCache(layouts, batch, max_len, dtype or p.dtype, p.device, kernel)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor, scale: float,
           q_rope: torch.Tensor | None = None, k_rope: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of t new queries at positions start[i].. of sequence i over its cached keys.

    q [t, b, h, e], k [b, hk, L, e], v [b, hk, L, ev], hk dividing h (query head i reads KV head
    i // (h/hk)); optionally a RoPE part shared by all heads, q_rope [t, b, h, r] and k_rope [b, 1, L, r],
    whose scores add to q·k: keys are never concatenated or copied per head. start [b] int. Keys past a
    query's position (later tokens, or a buffer's unfilled tail) are masked. -> [t, b, h, ev].
    """
    t, b, h, e = q.shape
    hk, L = k.shape[1], k.shape[2]
    g = h // hk
    # 1. the g query heads of a KV head become g*t query rows of one matrix product with its cache
    scores = q.permute(1, 2, 0, 3).reshape(b, hk, g * t, e) @ k.transpose(-1, -2)
    if q_rope is not None:
        rope = q_rope.permute(1, 2, 0, 3).reshape(b, 1, h * t, -1) @ k_rope.transpose(-1, -2)
        scores = scores + rope.view(b, hk, g * t, L)
    # 2. causal mask by each sequence's absolute positions, softmax in fp32 with the training-time scale
    pos = start[:, None] + torch.arange(t, device=q.device)  # [b, t]
    mask = (torch.arange(L, device=q.device) <= pos[..., None]).repeat(1, g, 1)[:, None]  # [b, 1, g*t, L]
    probs = (scores.float() * scale).masked_fill(~mask, float("-inf")).softmax(-1).to(v.dtype)
    return (probs @ v).view(b, hk, g, t, -1).permute(3, 0, 1, 2, 4).reshape(t, b, h, -1)


def attend_cached(cache: KVCache, q, k, v, scale: float, q_rope=None, k_rope=None,
                  tied: bool = False) -> torch.Tensor:
    """What an attention type's decode step attends with: `attend`, or for a one-token step the kernel
    the cache asks for (KVCache.kernel). tied: the key is the value's first dims (GTA, absorbed GLA/MLA),
    which the kernel reads only once."""
    dtype = q.dtype  # a cache may be kept in another dtype than the model's: attend in the cache's
    q, q_rope = (None if x is None else x.to(v.dtype) for x in (q, q_rope))
    if cache.kernel is None or q.shape[0] != 1:
        return attend(q, k, v, cache.lengths, scale, q_rope, k_rope).to(dtype)
    if cache.kernel == "sdpa" and not tied and q_rope is None:
        from models.kernels.sdpa_decode import sdpa_decode

        return sdpa_decode(q[0], k, v, cache.lengths + 1, scale)[None].to(dtype)
    from models.kernels.decode import decode_attention

    out = decode_attention(q[0], None if tied else k, v, cache.lengths + 1, scale,
                           None if q_rope is None else q_rope[0], k_rope)
    return out[None].to(dtype)
