"""Split-K flash-decoding: one query token per sequence over a static KV cache, each cached byte read once.

One Triton kernel serves every cache layout of keel's attention types, specialised at compile time:
  separate K, V   MHA/GQA/MQA   keys k [b, hk, L, ek], values v [b, hk, L, ev]
  tied            GTA           the key's first ek dims are the value's: one load per cached block
                  GLA/MLA       (absorbed) key = value = the latent, ek = ev = d_c
  + RoPE key      GTA/GLA/MLA   k_rope [b, 1, L, r] shared by all heads: a second score term
The g = h/hk query heads of one KV head are the rows of one matrix product with its cache block, so
K/V are never expanded per head; where g heads would not fit one program (absorbed MLA's 64-128 heads
over a 512-wide latent), blocks of them do (`head_block`). Grid: (batch x KV heads x head blocks,
splits); each program walks its share of the sequence's valid keys with an fp32 running softmax, and a
small PyTorch reduction merges the splits. Offsets are 64-bit: a cache passes 2^31 elements at long
contexts. tools/kernel_check.py compiles every launch keel makes for sm_80, sm_90a and sm_100a on any
machine and reads its registers, spills and shared memory.
Shapes depend only on the buffers, never on the lengths (a tensor), so the call can be captured in a
CUDA graph. The PyTorch path (`models.inference.attend`) is the reference and the CPU path.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, F32: tl.constexpr):
    """a @ b with fp32 accumulation; F32 multiplies in fp32 too (Triton's interpreter gets bf16 dots wrong)."""
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision="ieee")  # input_precision only matters for fp32 inputs: no TF32


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, qr_ptr, kr_ptr, len_ptr, acc_ptr, m_ptr, l_ptr,
                  sq_b, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sqr_b, sqr_h, skr_b, skr_l,
                  HK, G, EK, EV, R, SPLITS, HEAD_BLOCKS, scale_log2,
                  TIED: tl.constexpr, HAS_ROPE: tl.constexpr, G_BLOCK: tl.constexpr, EK_PAD: tl.constexpr,
                  EV_PAD: tl.constexpr, R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, F32: tl.constexpr):
    pid, split = tl.program_id(0), tl.program_id(1)
    # 64-bit from here on: batch x heads x buffer x dims passes 2^31 elements in long-context batches
    bh = (pid // HEAD_BLOCKS).to(tl.int64)
    b, kh = bh // HK, bh % HK
    rows = (pid % HEAD_BLOCKS) * G_BLOCK + tl.arange(0, G_BLOCK)  # a block of this KV head's g query heads
    live = rows < G
    heads = kh * G + rows
    cols_k, cols_v, cols_r = tl.arange(0, EK_PAD), tl.arange(0, EV_PAD), tl.arange(0, R_PAD)
    length = tl.load(len_ptr + b)
    # the sequence's valid keys split evenly, in whole blocks, from its own length (not the buffer's)
    chunk = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, length)

    # 1. queries: tied layouts read the key as the value's first EK dims, so q is zero beyond EK
    if TIED:
        q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + cols_v[None, :],
                    mask=live[:, None] & (cols_v[None, :] < EK), other=0.0)
    else:
        q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + cols_k[None, :],
                    mask=live[:, None] & (cols_k[None, :] < EK), other=0.0)
    if HAS_ROPE:
        qr = tl.load(qr_ptr + b * sqr_b + heads[:, None] * sqr_h + cols_r[None, :],
                     mask=live[:, None] & (cols_r[None, :] < R), other=0.0)

    m = tl.full([G_BLOCK], float("-inf"), tl.float32)
    l = tl.zeros([G_BLOCK], tl.float32)
    acc = tl.zeros([G_BLOCK, EV_PAD], tl.float32)
    v_base = v_ptr + b * sv_b + kh * sv_h
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        valid = n < hi
        v = tl.load(v_base + n[:, None] * sv_l + cols_v[None, :], mask=valid[:, None] & (cols_v[None, :] < EV),
                    other=0.0)
        # 2. scores of the block, in fp32
        if TIED:
            s = _dot(q, tl.trans(v), F32)
        else:
            k = tl.load(k_ptr + b * sk_b + kh * sk_h + n[:, None] * sk_l + cols_k[None, :],
                        mask=valid[:, None] & (cols_k[None, :] < EK), other=0.0)
            s = _dot(q, tl.trans(k), F32)
        if HAS_ROPE:
            kr = tl.load(kr_ptr + b * skr_b + n[:, None] * skr_l + cols_r[None, :],
                         mask=valid[:, None] & (cols_r[None, :] < R), other=0.0)
            s += _dot(qr, tl.trans(kr), F32)
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
        # 3. running softmax (base 2): rescale what was summed so far to the new maximum
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, F32)
        m = m_new

    # 4. unnormalised partials of this split; an empty split leaves m = -inf and contributes nothing
    part = (bh * SPLITS + split) * G + rows
    tl.store(acc_ptr + part[:, None] * EV + cols_v[None, :], acc, mask=live[:, None] & (cols_v[None, :] < EV))
    tl.store(m_ptr + part, m, mask=live)
    tl.store(l_ptr + part, l, mask=live)


def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot needs every dimension >= 16


def num_splits(batch: int, kv_heads: int, max_len: int, block: int, programs: int = 264) -> int:
    """Enough programs to fill the device (about two per SM on an H100/H200), none shorter than a block."""
    return max(1, min(math.ceil(programs / (batch * kv_heads)), math.ceil(max_len / block)))


def head_block(g: int, ev: int) -> int:
    """Query heads per program: all g of a KV head where their fp32 accumulator [heads, ev] stays small, else
    blocks of them, so that any head count fits the registers and shared memory (absorbed MLA serves 128
    heads from one 512-wide latent: all at once needs about 262 KB of shared memory, more than an H100 has).
    A block re-reads its KV head's cache from L2; `tools/kernel_check.py` checks every layout keel launches."""
    return min(_pad(g), max(16, 8192 // _pad(ev)))


class Launch(NamedTuple):
    """One call of the kernel: its grid, positional arguments and compile-time options, and the output's
    shape. `tools/kernel_check.py` compiles the same launch for GPU targets without a GPU."""
    grid: tuple[int, int]
    args: tuple
    options: dict
    shape: tuple[int, int, int, int, int]  # batch, KV heads, splits, query heads per KV head, value width


def plan(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor, lengths: torch.Tensor, scale: float,
         q_rope: torch.Tensor | None = None, k_rope: torch.Tensor | None = None,
         splits: int | None = None, block: int | None = None) -> Launch:
    """The kernel launch for these inputs (see `decode_attention`), with the partial results allocated."""
    tensors = {"q": q, "k": k, "v": v, "q_rope": q_rope, "k_rope": k_rope}
    dtypes = {name: t.dtype for name, t in tensors.items() if t is not None}
    if len(set(dtypes.values())) > 1:  # Triton's dot refuses mixed operands (the interpreter alone runs them)
        found = ", ".join(f"{name} {dtype}" for name, dtype in dtypes.items())
        raise ValueError(f"decode kernel: query and cache dtypes differ ({found}); cast the query to the cache's dtype")
    bsz, h, ek = q.shape
    hk, max_len, ev = v.shape[1], v.shape[2], v.shape[3]
    g = h // hk
    tied, rope = k is None, q_rope is not None
    # wide rows (latents, fp32): smaller blocks of keys keep the tiles in registers and the pipelined
    # copies within shared memory (an fp32 MLA latent of 512 in blocks of 32 needs 182 KB, an A100 has 163)
    row_bytes = ev * v.element_size()
    block = block or (64 if ev <= 128 else 32 if row_bytes <= 1024 else 16)
    splits = splits or num_splits(bsz, hk, max_len, block)
    g_block = head_block(g, ev)
    head_blocks = math.ceil(g / g_block)
    parts = bsz * hk * splits * g
    acc = torch.empty(parts, ev, dtype=torch.float32, device=q.device)
    m = torch.empty(parts, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    kk = v if tied else k
    qr, kr = (q_rope, k_rope) if rope else (q, v)  # unused pointers when there is no RoPE part
    r = qr.shape[-1] if rope else 16
    args = (q, kk, v, qr, kr, lengths, acc, m, l,
            q.stride(0), q.stride(1), kk.stride(0), kk.stride(1), kk.stride(2), v.stride(0), v.stride(1), v.stride(2),
            qr.stride(0), qr.stride(1), kr.stride(0), kr.stride(2),
            hk, g, ek, ev, r, splits, head_blocks, scale * math.log2(math.e))
    options = dict(TIED=tied, HAS_ROPE=rope, G_BLOCK=g_block, EK_PAD=_pad(ek), EV_PAD=_pad(ev), R_PAD=_pad(r),
                   BLOCK_N=block, F32=bool(triton.knobs.runtime.interpret),
                   num_warps=8 if row_bytes > 512 else 4)  # wide rows: more threads, so no registers spill
    return Launch((bsz * hk * head_blocks, splits), args, options, (bsz, hk, splits, g, ev))


def decode_attention(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor, lengths: torch.Tensor, scale: float,
                     q_rope: torch.Tensor | None = None, k_rope: torch.Tensor | None = None,
                     splits: int | None = None, block: int | None = None) -> torch.Tensor:
    """One query token per sequence over the first lengths[i] cached keys of sequence i.

    q [b, h, ek]; v [b, hk, L, ev] with hk dividing h; k [b, hk, L, ek], or None when the key is the
    value's first ek dims (tied: GTA, absorbed GLA/MLA); q_rope [b, h, r] and k_rope [b, 1, L, r]
    optional, all of one dtype; lengths [b] int, each >= 1.
    -> [b, h, ev] in q's dtype, the softmax in fp32 with `scale`.
    """
    if not q.is_cuda and not triton.knobs.runtime.interpret:
        raise ValueError("the Triton decode kernel needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                         "anything imports triton); the PyTorch path is KVCache(kernel=None)")
    # the kernel indexes every tensor's last dim with stride 1 (a query from einsum may not have it)
    q, k, v, q_rope, k_rope = (x if x is None or x.stride(-1) == 1 else x.contiguous()
                               for x in (q, k, v, q_rope, k_rope))
    launch = plan(q, k, v, lengths, scale, q_rope, k_rope, splits, block)
    _split_kernel[launch.grid](*launch.args, **launch.options)
    acc, m, l = launch.args[6:9]
    bsz, hk, splits, g, ev = launch.shape
    return merge_splits(acc.view(bsz, hk, splits, g, ev), m.view(bsz, hk, splits, g), l.view(bsz, hk, splits, g)
                        ).reshape(bsz, q.shape[1], ev).to(q.dtype)


def merge_splits(acc: torch.Tensor, m: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Combine the splits' running softmaxes ([b, hk, S, g(, ev)], base-2 maxima) -> [b, hk, g, ev]."""
    w = torch.exp2(m - m.amax(2, keepdim=True))  # every sequence has a key in split 0: the max is finite
    return (acc * w[..., None]).sum(2) / (l * w).sum(2)[..., None]
