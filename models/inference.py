"""KV-cache decoding for every attention type, over a trained KeelGPT's own modules and weights.

The cache keeps exactly what each method needs per token and layer (this rank's share under TP):
  MHA/GQA/MQA  k, v              2 * h_kv * d        (megatron's SelfAttention; RoPE over all d dims)
  GTA          kv, k_rope        h_kv * d + d_R
  GLA / MLA    latent, k_rope    h_c * d_c + d_R     (MLA: h_c = 1, d_c = kv_lora_rank)
GLA/MLA decode in absorbed form by default: queries are mapped into latent space (q~ = W_UKᵀ q_nope),
attention runs over the cached latents + RoPE key with the training-time scale, and W_UV is folded into
the output projection. `absorbed=False` re-expands the latents into per-head keys/values (the naive
form, for tests).
"""

from __future__ import annotations

import math

import torch
from megatron.core.tensor_parallel.mappings import (
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.transformer.attention import SelfAttention

from models.attention.common import apply_rope
from models.config import AttentionConfig, ModelConfig
from models.attention.gla import LatentAttention
from models.attention.gta import GroupedTiedAttention

Layout = dict[str, tuple[int, ...]]  # cached tensor name -> its shape per token


class KVCache:
    """Preallocated per-layer cache tensors and the number of tokens filled.

    Each tensor of per-token shape (heads, e) is stored head-major, [batch, heads, max_len, e], so the
    cached keys of one head are one contiguous matrix that attention reads in place.
    """

    def __init__(self, layouts: list[Layout], batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.layouts, self.max_len, self.length = layouts, max_len, 0
        self.layers = [{name: torch.zeros(batch, heads, max_len, e, dtype=dtype, device=device)
                        for name, (heads, e) in layout.items()} for layout in layouts]

    def update(self, layer: int, new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Write `new` ([t, b, heads, e] each) after the filled part; return all cached [b, heads, L, e]."""
        t = next(iter(new.values())).shape[0]
        if self.length + t > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} tokens; {self.length + t} requested")
        views = {}
        for name, value in new.items():
            buf = self.layers[layer][name]
            buf[:, :, self.length:self.length + t] = value.permute(1, 2, 0, 3)
            views[name] = buf[:, :, :self.length + t]
        return views

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


def new_cache(gpt, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
    p = next(gpt.parameters())
    layouts = [cache_layout(layer.self_attention) for layer in gpt.decoder.layers]
    return KVCache(layouts, batch, max_len, dtype or p.dtype, p.device)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int, scale: float,
           q_rope: torch.Tensor | None = None, k_rope: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of t new queries at positions offset.. over all L cached keys.

    q [t, b, h, e], k [b, hk, L, e], v [b, hk, L, ev], hk dividing h (query head i reads KV head
    i // (h/hk)); optionally a RoPE part shared by all heads, q_rope [t, b, h, r] and k_rope [b, 1, L, r],
    whose scores add to q·k: keys are never concatenated or copied per head. -> [t, b, h, ev].
    """
    t, b, h, e = q.shape
    hk, L = k.shape[1], k.shape[2]
    g = h // hk
    # 1. the g query heads of a KV head become g*t query rows of one matrix product with its cache
    scores = q.permute(1, 2, 0, 3).reshape(b, hk, g * t, e) @ k.transpose(-1, -2)
    if q_rope is not None:
        rope = q_rope.permute(1, 2, 0, 3).reshape(b, 1, h * t, -1) @ k_rope.transpose(-1, -2)
        scores = scores + rope.view(b, hk, g * t, L)
    # 2. causal mask by absolute position, softmax in fp32 with the training-time scale
    pos = offset + torch.arange(t, device=q.device)
    mask = (torch.arange(L, device=q.device)[None, :] <= pos[:, None]).repeat(g, 1)
    probs = (scores.float() * scale).masked_fill(~mask, float("-inf")).softmax(-1).to(v.dtype)
    return (probs @ v).view(b, hk, g, t, -1).permute(3, 0, 1, 2, 4).reshape(t, b, h, -1)


def _standard_step(attn: SelfAttention, x, table, cache: KVCache, layer: int) -> torch.Tensor:
    q, k, v = attn.get_query_key_value_tensors(x)
    q = q.reshape(*q.shape[:2], -1, attn.hidden_size_per_attention_head)
    if table is not None:  # megatron rotates all d dims (rotary_percent = 1)
        q, k = apply_rope(q, table), apply_rope(k, table)
    c = cache.update(layer, {"k": k, "v": v})
    out = attend(q, c["k"], c["v"], cache.length, attn.hidden_size_per_attention_head ** -0.5)
    return attn.linear_proj(out.flatten(2))[0]


def _gta_step(attn: GroupedTiedAttention, x, table, cache: KVCache, layer: int) -> torch.Tensor:
    q, kv, k_rope = attn.qkv(x, table)
    c = cache.update(layer, {"kv": kv, "k_rope": k_rope})
    n = attn.head_dim - attn.rope_dim  # key = [KV[:n] | shared RoPE key], value = KV
    out = attend(q[..., :n], c["kv"][..., :n], c["kv"], cache.length, attn.head_dim ** -0.5,
                 q[..., n:], c["k_rope"])
    return attn.linear_proj(out.flatten(2))[0]


def _latent_step(attn: LatentAttention, x, table, cache: KVCache, layer: int, absorbed: bool) -> torch.Tensor:
    q_nope, q_rope = attn.queries(x, table)
    new_c, new_rope = attn.latent_kv(x, table)
    c = cache.update(layer, {"latent": new_c, "k_rope": new_rope})
    latent, k_rope = c["latent"], c["k_rope"]
    if not absorbed:  # naive: re-expand every cached latent into per-head keys and values
        k_nope, v = attn.expand(latent.permute(2, 0, 1, 3))
        k_nope, v = k_nope.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)
        out = attend(q_nope, k_nope, v, cache.length, attn.softmax_scale, q_rope, k_rope)
        return attn.linear_proj(out.flatten(2))[0]
    # 1. queries into latent space: q~_i = W_UK,iᵀ q_nope,i for head i of latent j
    w_uk, w_o_abs = _absorbed_weights(attn)
    t, b = q_nope.shape[:2]
    q_nope = q_nope.view(t, b, attn.latents, -1, attn.head_dim)
    q_lat = torch.einsum("tbcgk,cgkn->tbcgn", q_nope, w_uk).flatten(2, 3)
    # 2. per latent a GQA-shaped attention: key [c_j | k_rope], value c_j, the training-time scale
    o = attend(q_lat, latent, latent, cache.length, attn.softmax_scale, q_rope, k_rope)
    # 3. W_UV folded into W_O: out = sum_i (W_O,i W_UV,i) o_i, summed over ranks under TP
    out = torch.einsum("tbhn,Dhn->tbD", o, w_o_abs)
    return reduce_from_tensor_model_parallel_region(out)


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


def attention_step(attn, x, table, cache: KVCache, layer: int, absorbed: bool = True) -> torch.Tensor:
    """One layer's attention for new tokens x [t, b, D] at positions cache.length.. -> [t, b, D]."""
    if isinstance(attn, GroupedTiedAttention):
        return _gta_step(attn, x, table, cache, layer)
    if isinstance(attn, LatentAttention):
        return _latent_step(attn, x, table, cache, layer, absorbed)
    return _standard_step(attn, x, table, cache, layer)


@torch.no_grad()
def forward_cached(gpt, tokens: torch.Tensor, cache: KVCache, absorbed: bool = True) -> torch.Tensor:
    """Logits [b, t, vocab] for `tokens` [b, t] following the cached ones; the cache grows by t.
    Under TP every rank gets the full vocabulary, so sampling agrees across ranks."""
    b, t = tokens.shape
    start = cache.length
    positions = torch.arange(start, start + t, device=tokens.device)
    h = gpt.embedding(input_ids=tokens, position_ids=positions[None].expand(b, t))
    table = gpt.rotary_pos_emb(start + t)[start:] if getattr(gpt, "rotary_pos_emb", None) is not None else None
    for i, layer in enumerate(gpt.decoder.layers):
        h = h + attention_step(layer.self_attention, layer.input_layernorm(h), table, cache, i, absorbed)
        h = h + layer.mlp(layer.pre_mlp_layernorm(h))[0]
    if gpt.decoder.final_layernorm is not None:
        h = gpt.decoder.final_layernorm(h)
    weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else None
    logits = gather_from_tensor_model_parallel_region(gpt.output_layer(h, weight=weight)[0])
    cache.length += t
    return logits.transpose(0, 1).float()[..., :gpt.unpadded_vocab_size]  # padded rows are never predicted


@torch.no_grad()
def generate(gpt, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             generator: torch.Generator | None = None, eos: int | None = None) -> torch.Tensor:
    """Continue `prompt` [b, t]: prefill once, then one token per step with the cache (greedy at T=0)."""
    cache = new_cache(gpt, prompt.shape[0], prompt.shape[1] + max_new_tokens)
    logits = forward_cached(gpt, prompt, cache)[:, -1]
    out = [prompt]
    for _ in range(max_new_tokens):
        nxt = sample(logits, temperature, top_k, generator)
        out.append(nxt[:, None])
        if eos is not None and bool((nxt == eos).all()):
            break
        logits = forward_cached(gpt, nxt[:, None], cache)[:, -1]
    return torch.cat(out, dim=1)


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
