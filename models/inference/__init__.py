"""KV-cache decoding for every attention type, over a trained KeelGPT's own modules and weights.

Each attention type owns its cache layout and its decode step (`cache_layout`, `decode_step` in
models/attention/); this package holds what they share: the cache and the attention over it (cache.py),
the whole model's step (step.py), its CUDA graph (graph.py) and generation (generate.py).

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
split-K Triton kernel of models/kernels/decode.py; `cache.attend` is the CPU path and its reference.
"""

from models.inference.cache import KERNELS, Kernel, KVCache, attend, attend_cached, new_cache
from models.inference.generate import build_for_decode, generate, right_pad, sample
from models.inference.graph import CapturedStep
from models.inference.step import forward_cached, forward_static

__all__ = ["KERNELS", "CapturedStep", "KVCache", "Kernel", "attend", "attend_cached", "build_for_decode",
           "forward_cached", "forward_static", "generate", "new_cache", "right_pad", "sample"]
