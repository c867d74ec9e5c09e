"""KV-cache decoding for every attention type, over a trained KeelGPT's own modules and weights.

The cache keeps exactly what each method needs per token and layer (this rank's share under TP):
  MHA/GQA/MQA  k, v              2 * h_kv * d        (megatron's SelfAttention; RoPE over all d dims)
  GTA          kv, k_rope        h_kv * d + d_R
  GLA / MLA    latent, k_rope    h_c * d_c + d_R     (MLA: h_c = 1, d_c = kv_lora_rank)
GLA/MLA decode in absorbed form by default: queries are mapped into latent space (q~ = W_UKᵀ q_nope),
attention runs over the cached latents + RoPE key with the training-time scale, and W_UV is folded into
the output projection. `absorbed=False` re-expands the latents into per-head keys/values (the naive
form, for tests).

QK-norm (`attention.qk_norm`) keeps every cache layout. megatron's SelfAttention normalises q and k
inside `get_query_key_value_tensors`, before RoPE, as in training. GTA's key is then the normalised
view of the cached value's first d - d_R dims, recomputed from the cache at each step (separate K and V
for the kernel). GLA/MLA decode re-expanded, never absorbed: the key norm divides each head's score by
rms(W_UK,i c_j), a per-head, per-token factor that no query-side matrix can carry, so absorption would no
longer equal the trained model. The price is compute (every cached latent projected up per step), not
cache bytes; caching the h per-token factors (h more elements per token, and a kernel that scales each
head's content score by them) would restore absorption.

Two ways to run a step: `forward_cached` (eager, any number of tokens, reads only the filled part) and
`forward_static` (whole buffers, per-sequence lengths on the device, no host sync), which
`CapturedStep` records in a CUDA graph for one-token decoding. On CUDA one-token steps attend with the
split-K Triton kernel of models/kernels/decode.py; `attend` below is the CPU path and its reference.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from megatron.core.tensor_parallel.mappings import (
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.transformer.attention import SelfAttention

from models.attention.common import apply_rope, tp_group
from models.config import AttentionConfig, ModelConfig
from models.attention.gla import LatentAttention
from models.attention.gta import GroupedTiedAttention

Layout = dict[str, tuple[int, ...]]  # cached tensor name -> its shape per token
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


def cache_layout(attn: torch.nn.Module) -> Layout:
    """What this rank's attention module caches per token."""
    if isinstance(attn, GroupedTiedAttention):
        if not attn.tied:
            raise ValueError("decoding needs the tied GTA (tied=False exists only to check the wiring)")
        return {"kv": (attn.kv_heads, attn.head_dim), "k_rope": (1, attn.rope_dim)}
    if isinstance(attn, LatentAttention):
        return {"latent": (attn.latents, attn.latent_dim), "k_rope": (1, attn.rope_dim)}
    if isinstance(attn, SelfAttention):
        shape = (attn.num_query_groups_per_partition, attn.hidden_size_per_attention_head)
        return {"k": shape, "v": shape}
    raise TypeError(f"no decode path for {type(attn).__name__}")


def new_cache(gpt, batch: int, max_len: int, dtype: torch.dtype | None = None,
              kernel: Kernel | Literal["auto"] = "auto") -> KVCache:
    """The model's cache; kernel "auto": the Triton kernel on CUDA, the PyTorch path elsewhere."""
    p = next(gpt.parameters())
    layouts = [cache_layout(layer.self_attention) for layer in gpt.decoder.layers]
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


def _attend(cache: KVCache, q, k, v, scale: float, q_rope=None, k_rope=None, tied: bool = False) -> torch.Tensor:
    """attend(), or for a one-token step the kernel the cache asks for (KVCache.kernel).
    tied: the key is the value's first dims (GTA, absorbed GLA/MLA), which the kernel reads only once."""
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


def _standard_step(attn: SelfAttention, x, table, cache: KVCache, layer: int, upto) -> torch.Tensor:
    q, k, v = attn.get_query_key_value_tensors(x)
    q = q.reshape(*q.shape[:2], -1, attn.hidden_size_per_attention_head)
    if table is not None:  # megatron rotates all d dims (rotary_percent = 1)
        q, k = apply_rope(q, table), apply_rope(k, table)
    cache.write(layer, {"k": k, "v": v})
    c = cache.read(layer, upto)
    out = _attend(cache, q, c["k"], c["v"], attn.hidden_size_per_attention_head ** -0.5)
    return attn.linear_proj(out.flatten(2))[0]


def _gta_step(attn: GroupedTiedAttention, x, table, cache: KVCache, layer: int, upto) -> torch.Tensor:
    q, kv, k_rope = attn.qkv(x, table)
    cache.write(layer, {"kv": kv, "k_rope": k_rope})
    c = cache.read(layer, upto)
    n = attn.head_dim - attn.rope_dim  # key = [KV[:n] | shared RoPE key], value = KV
    tied = attn.qk_norm is None  # with QK-norm the key is the normalised KV[:n], no longer the value's own dims
    out = _attend(cache, q[..., :n], attn.key_nope(c["kv"]), c["kv"], attn.head_dim ** -0.5, q[..., n:], c["k_rope"],
                  tied=tied)
    return attn.linear_proj(out.flatten(2))[0]


def _latent_step(attn: LatentAttention, x, table, cache: KVCache, layer: int, upto, absorbed: bool) -> torch.Tensor:
    q_nope, q_rope = attn.queries(x, table)
    new_c, new_rope = attn.latent_kv(x, table)
    cache.write(layer, {"latent": new_c, "k_rope": new_rope})
    c = cache.read(layer, upto)
    latent, k_rope = c["latent"], c["k_rope"]
    if not absorbed or attn.qk_norm is not None:  # re-expand every cached latent into per-head keys and values
        k_nope, v = attn.expand(latent.permute(2, 0, 1, 3))  # (normalised keys with qk_norm)
        k_nope, v = k_nope.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)
        out = _attend(cache, q_nope, k_nope, v, attn.softmax_scale, q_rope, k_rope)
        return attn.linear_proj(out.flatten(2))[0]
    # 1. queries into latent space: q~_i = W_UK,iᵀ q_nope,i for head i of latent j
    w_uk, w_o_abs = _absorbed_weights(attn)
    t, b = q_nope.shape[:2]
    q_nope = q_nope.view(t, b, attn.latents, -1, attn.head_dim)
    q_lat = torch.einsum("tbcgk,cgkn->tbcgn", q_nope, w_uk).flatten(2, 3)
    # 2. per latent a GQA-shaped attention: key [c_j | k_rope], value c_j, the training-time scale
    o = _attend(cache, q_lat, latent, latent, attn.softmax_scale, q_rope, k_rope, tied=True)
    # 3. W_UV folded into W_O: out = sum_i (W_O,i W_UV,i) o_i, summed over ranks under TP
    out = torch.einsum("tbhn,Dhn->tbD", o, w_o_abs)
    return reduce_from_tensor_model_parallel_region(out, group=tp_group())


def _absorbed_weights(attn: LatentAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """W_UK [c, g, d, d_c] and W_O absorbed with W_UV [D, h, d_c]; memoised until the weights change."""
    up_w, o_w = attn.linear_kv_up_proj.weight, attn.linear_proj.weight
    key = (up_w.data_ptr(), up_w._version, o_w.data_ptr(), o_w._version, up_w.dtype)
    memo = getattr(attn, "_keel_absorbed", None)
    if memo is None or memo[0] != key:
        up = attn.up_weight().detach()  # [c, g, 2d, d_c]
        w_uk, w_uv = up[:, :, :attn.head_dim], up[:, :, attn.head_dim:]
        w_o = o_w.detach().view(-1, attn.latents, up.shape[1], attn.head_dim)  # [D, c, g, d]
        w_o_abs = torch.einsum("Dcgk,cgkn->Dcgn", w_o.float(), w_uv.float()).flatten(1, 2).to(o_w.dtype)
        memo = (key, w_uk, w_o_abs)
        attn._keel_absorbed = memo
    return memo[1], memo[2]


def attention_step(attn, x, table, cache: KVCache, layer: int, absorbed: bool = True,
                   upto: int | None = None) -> torch.Tensor:
    """One layer's attention for new tokens x [t, b, D] at positions cache.lengths.. -> [t, b, D]:
    over the first `upto` cached positions, or the whole buffers when None (static shapes)."""
    if isinstance(attn, GroupedTiedAttention):
        return _gta_step(attn, x, table, cache, layer, upto)
    if isinstance(attn, LatentAttention):
        return _latent_step(attn, x, table, cache, layer, upto, absorbed)
    return _standard_step(attn, x, table, cache, layer, upto)


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
        h = h + attention_step(layer.self_attention, layer.input_layernorm(h), table, cache, i, absorbed, upto)
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
    """The bare GPT at this world's TP size, initialised like training (no DDP), in eval mode."""
    from models.builder import build_initialised_gpt

    return build_initialised_gpt(model, attention, vocab_size, seed, dtype).to(device=device, dtype=dtype).eval()
