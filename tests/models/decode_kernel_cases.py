"""Cases for tests/models/test_decode_kernels.py: the split-K decode kernel and the PyTorch path on the
same inputs. On CPU the test runs this module in a subprocess whose environment sets TRITON_INTERPRET=1
before anything imports triton (megatron imports it, so an already running process cannot switch):

    TRITON_INTERPRET=1 python -m tests.models.decode_kernel_cases OUT.pt

OUT.pt holds {case id: (kernel result, reference)}; on a GPU the test calls `run_all` in-process.
"""

from __future__ import annotations

import math
import sys

import torch

# (h, hk, ek, ev, rope width, tied): what each attention type caches, at small sizes
LAYOUTS = {
    "mha": (4, 4, 16, 16, 0, False),
    "gqa": (4, 2, 16, 16, 0, False),
    "mqa": (4, 1, 16, 16, 0, False),
    "gta": (4, 2, 8, 16, 8, True),  # key = KV[:8] | shared RoPE key of 8, value = KV (16)
    "gla": (4, 2, 32, 32, 8, True),  # absorbed: key = value = the latent (d_c 32) | RoPE key
    "mla": (4, 1, 64, 64, 8, True),
    "mla-40-heads": (40, 1, 512, 512, 8, True),  # query heads in blocks of 16: 16 + 16 + 8 (decode.head_block)
}
SHAPES = {  # id: (lengths, buffer length, splits); blocks of 16 keys
    "b1-one-token": ([1], 5, None),
    "b1-odd-3splits": ([37], 40, 3),  # not a multiple of the block
    "ragged-empty-split": ([19, 1, 50], 53, 2),  # odd and different lengths; sequence 2's 2nd split is empty
    "block-edges": ([16, 33], 33, None),  # exactly one block, and one token past two
}
BF16 = ("gqa", "gta", "gla")
GROUPED = ("mha", "gqa", "mqa")  # the layouts torch's SDPA fits
TYPES = ("mha", "gqa", "mqa", "gta", "gla", "mla")
QK_NORM = ("gta", "mla")  # with QK-norm these read separate keys: GTA's normalised KV[:d - d_R], MLA's expanded heads


def _inputs(layout: str, lengths: list[int], max_len: int, device, dtype=torch.float32, seed: int = 0):
    """Random queries and full cache buffers (garbage past each length, which must be ignored)."""
    h, hk, ek, ev, r, tied = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    q, v = rnd(b, h, ek), rnd(b, hk, max_len, ev)
    k = None if tied else rnd(b, hk, max_len, ek)
    q_rope, k_rope = (rnd(b, h, r), rnd(b, 1, max_len, r)) if r else (None, None)
    return q, k, v, q_rope, k_rope, torch.tensor(lengths, device=device), 1 / math.sqrt(ek + r)


def _reference(q, k, v, q_rope, k_rope, lengths, scale):
    """models.inference.attend, the CPU path, in fp32: the new query of sequence i sits at lengths[i] - 1."""
    from models.inference import attend

    up = (lambda x: None if x is None else x.float())
    key = v[..., :q.shape[-1]] if k is None else k
    return attend(q[None].float(), up(key), v.float(), lengths - 1, scale,
                  None if q_rope is None else q_rope[None].float(), up(k_rope))[0]


def kernel_inputs(layout: str, shape: str, device, dtype=torch.float32) -> tuple[tuple, dict]:
    """The arguments of one `decode_attention` call of this case (tests/models/test_kernel_targets.py
    compiles the same calls for GPU targets)."""
    lengths, max_len, splits = SHAPES[shape]
    return _inputs(layout, lengths, max_len, device, dtype), {"splits": splits, "block": 16}


def kernel_case(layout: str, shape: str, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    from models.kernels.decode import decode_attention

    (q, k, v, q_rope, k_rope, lens, scale), options = kernel_inputs(layout, shape, device, dtype)
    out = decode_attention(q, k, v, lens, scale, q_rope, k_rope, **options)
    return out.float().cpu(), _reference(q, k, v, q_rope, k_rope, lens, scale).cpu()


def wide_offsets_case(device) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache whose sequence 2 starts 2^31 elements into its buffers (batch x heads x length x dims
    past what int32 offsets reach, as MHA at batch 64 x 32k does): the kernel must read it there, not at a
    wrapped-around address. On the CPU the 24 GiB of buffers are a sparse file mapped into memory, of which
    only the few valid keys are ever touched."""
    import tempfile

    from models.kernels.decode import decode_attention

    b, h, e, length = 3, 2, 16, 2 ** 26  # 2^30 elements per sequence
    lengths = torch.tensor([3, 5, 7], device=device)
    with tempfile.TemporaryDirectory() as tmp:
        if device == "cpu":
            path = f"{tmp}/cache"
            with open(path, "wb") as f:
                f.truncate(2 * b * length * e * 4)
            buffers = torch.from_file(path, shared=True, size=2 * b * length * e, dtype=torch.float32)
        else:
            buffers = torch.empty(2 * b * length * e, dtype=torch.float32, device=device)
        k, v = buffers.view(2, b, 1, length, e)
        g = torch.Generator().manual_seed(0)
        valid = {name: torch.randn(b, 1, 8, e, generator=g).to(device) for name in ("k", "v")}
        k[:, :, :8], v[:, :, :8] = valid["k"], valid["v"]
        q = torch.randn(b, h, e, generator=g).to(device)
        out = decode_attention(q, k, v, lengths, e ** -0.5, splits=2, block=16)
        ref = _reference(q, valid["k"], valid["v"], None, None, lengths, e ** -0.5)
        result = out.cpu(), ref.cpu()
        del buffers, k, v
    return result


def sdpa_case(layout: str, shape: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The SDPA option for grouped K/V heads (models/kernels/sdpa_decode.py) on the same inputs."""
    from models.kernels.sdpa_decode import sdpa_decode

    q, k, v, q_rope, k_rope, lens, scale = _inputs(layout, *SHAPES[shape][:2], device)
    return sdpa_decode(q, k, v, lens, scale).cpu(), _reference(q, k, v, q_rope, k_rope, lens, scale).cpu()


def model_case(attention: str, device, kernel: str = "triton",
               overrides: tuple[str, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached decoding with kernel steps (prefill 4 with the PyTorch path, then 7 one-token steps) and
    one full forward of the same tokens; needs a megatron world."""
    from models.inference import forward_cached, new_cache
    from tests.helpers import build_tiny_gpt

    _, gpt = build_tiny_gpt([f"attention={attention}", "model.init_std=0.2", *overrides])
    gpt = gpt.to(device)
    tokens = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        full = gpt(tokens, torch.arange(11, device=device)[None].expand(2, -1), None)
    cache = new_cache(gpt, 2, 11, kernel=kernel)
    parts = [forward_cached(gpt, tokens[:, :4], cache)]
    parts += [forward_cached(gpt, tokens[:, i:i + 1], cache) for i in range(4, 11)]
    return torch.cat(parts, 1).cpu(), full.cpu()


def run_all(device) -> dict:
    """Every case; model cases need a megatron world (the caller's, or `main`'s)."""
    out = {f"{layout}-{shape}": kernel_case(layout, shape, device) for layout in LAYOUTS for shape in SHAPES}
    out |= {f"bf16-{layout}": kernel_case(layout, "ragged-empty-split", device, torch.bfloat16) for layout in BF16}
    out |= {f"sdpa-{layout}-{shape}": sdpa_case(layout, shape, device) for layout in GROUPED for shape in SHAPES}
    out["wide-offsets"] = wide_offsets_case(device)
    out |= {f"model-{t}": model_case(t, device) for t in TYPES}
    out |= {f"model-sdpa-{t}": model_case(t, device, "sdpa") for t in ("gqa", "gta")}  # GTA falls to Triton
    out |= {f"model-qk-norm-{t}": model_case(t, device, overrides=("attention.qk_norm=true",)) for t in QK_NORM}
    return out


def main(path: str) -> None:
    from pretrain import cpu_compat, distributed
    from pretrain.config import ParallelConfig

    cpu_compat.apply()
    distributed.init(ParallelConfig())
    try:
        torch.save(run_all("cpu"), path)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
