"""Compile keel's Triton kernels for real GPUs on any machine, and read what each specialisation costs.

    python tools/kernel_check.py [--targets sm_80 sm_90a sm_100a] [--json]

Triton's interpreter (TRITON_INTERPRET=1, what the CPU suite runs) executes a kernel's Python, so it
accepts what a GPU compiler rejects (mixed-dtype dots) and says nothing of registers or shared memory.
This tool compiles the real thing instead, without a GPU: each launch keel makes is captured by running
the decode step on the `meta` device (shapes and strides exact, no memory), specialised by Triton's own
launcher binder (16-byte-aligned pointers and 16-divisible integers marked as at run time, integers equal
to 1 folded in; without that the same layout compiles to other code), compiled through LLVM and the ptxas
bundled with Triton, and read back with the bundled `cuobjdump --dump-resource-usage`.

It checks every launch of bench_decode.py's presets (bf16 and fp32) and of absorbed MLA at 64 and 128
query heads per latent (DeepSeek-V3's 128 heads of a 512-wide latent): that it compiles, that its shared
memory fits the target, and that no registers spill. tests/models/test_kernel_targets.py adds the CPU
suite's own layouts. Identical specialisations are compiled once.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

import torch

from pretrain import cpu_compat  # noqa: F401  (silences megatron's import warnings)

# Triton's arch numbers (90 and 100 compile for sm_90a and sm_100a) and the most shared memory one block
# may use there (CUDA's per-block opt-in maximum: 163 KB on A100, 227 KB on H100/H200 and B200)
TARGETS = {"sm_80": (80, 166_912), "sm_90a": (90, 232_448), "sm_100a": (100, 232_448)}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# the layouts beyond bench_decode's presets that must fit: absorbed MLA with many heads per latent
WIDE_HEADS = {f"mla-{h}-heads": ["model.num_layers=1", f"model.hidden_size={128 * h}", "model.head_dim=128",
                                 "attention=mla", "attention.kv_lora_rank=512", "attention.qk_pos_emb_head_dim=64",
                                 "attention.q_lora_rank=1536"] for h in (64, 128)}


@dataclass(frozen=True)
class Case:
    """One launch to compile: where it comes from, the decode kernel's `Launch`, and its dtype's name."""
    name: str
    launch: object  # models.kernels.decode.Launch
    dtype: str


@dataclass
class Resources:
    case: str
    target: str
    registers: int
    spill_bytes: int  # local memory and stack: registers that did not fit
    shared_bytes: int  # static + dynamic shared memory of one block
    shared_limit: int
    specialisation: str  # the constexprs and integer attributes Triton compiled for

    @property
    def fits(self) -> bool:
        return self.shared_bytes <= self.shared_limit

    @property
    def ok(self) -> bool:
        """Fits and spills nothing: what the benchmarked layouts must do (a few spilled bytes in a tiny test
        layout cost nothing that matters)."""
        return self.fits and self.spill_bytes == 0


def capture_launches(overrides: list[str], shapes: list[tuple[int, int]], dtype: torch.dtype,
                     vocab: int = 256) -> dict[tuple[int, int], list]:
    """{(batch, cache length): the decode kernel's launches of one one-token step} for the model these
    overrides configure, captured on the meta device (needs a megatron world)."""
    from models import inference
    from models.kernels import decode
    from pretrain.config import compose_config

    cfg = compose_config(overrides)
    with torch.device("meta"):
        gpt = inference.build_for_decode(cfg.model, cfg.attention, vocab, cfg.seed, device="meta", dtype=dtype)
    launches: list = []

    def record(q, k, v, lengths, scale, q_rope=None, k_rope=None, splits=None, block=None):
        launches.append(decode.plan(q, k, v, lengths, scale, q_rope, k_rope, splits, block))
        return torch.empty(*q.shape[:2], v.shape[-1], dtype=q.dtype, device=q.device)

    out = {}
    for batch, max_len in shapes:
        cache = inference.new_cache(gpt, batch, max_len, kernel="triton")
        tokens = torch.zeros(batch, 1, dtype=torch.long, device="meta")
        with mock.patch.object(decode, "decode_attention", record), torch.no_grad():
            inference.forward_static(gpt, tokens, cache)
        out[batch, max_len], launches = launches, []
    return out


def specialise(launch, target: str):
    """Triton's own launcher binding of this launch for `target`: (options, signature, constexprs, attrs)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from models.kernels.decode import _split_kernel as kernel

    backend = make_backend(GPUTarget("cuda", TARGETS[target][0], 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.options)
    return kernel._pack_args(backend, launch.options, bound, specialization, options)


def compile_case(case: Case, target: str) -> Resources:
    """Compile one launch for `target` and read its registers, spills and shared memory from the cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from models.kernels.decode import _split_kernel as kernel

    options, signature, constexprs, attrs = specialise(case.launch, target)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                              target=GPUTarget("cuda", TARGETS[target][0], 32), options=options.__dict__)
    usage = _resource_usage(compiled.asm["cubin"])
    key = {k: v for k, v in case.launch.options.items() if k != "F32"} | {
        "divisible_by_16": sorted(kernel.arg_names[i[0]] for i, a in attrs.items() if a)}
    return Resources(case.name, target, usage["REG"], usage["STACK"] + usage["LOCAL"],
                     usage["SHARED"] + compiled.metadata.shared, TARGETS[target][1], json.dumps(key))


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, LOCAL and SHARED of the kernel function, as the bundled cuobjdump reads them."""
    tool = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    line = next(line for line in out.splitlines() if "REG:" in line)
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", line)}


def unique(cases: list[Case], target: str = "sm_90a") -> list[Case]:
    """One case per distinct specialisation (the first name that reaches it): the rest compile to the same binary."""
    seen, out = set(), []
    for case in cases:
        options, signature, constexprs, attrs = specialise(case.launch, target)
        key = (json.dumps(signature, sort_keys=True), repr(sorted(constexprs.items())), repr(sorted(attrs.items())),
               repr(sorted(options.__dict__.items())))
        if key not in seen:
            seen.add(key)
            out.append(case)
    return out


def preset_cases(dtypes=("bf16", "fp32"), steps: int = 10, warmup: int = 2) -> list[Case]:
    """Every launch bench_decode.py's presets make (each type, batch and context; the cache holds
    context + warmup + steps tokens, as there), and the wide-head MLA layouts."""
    from models.attention import attention_names
    from tools.bench_decode import PRESETS

    cases = []
    for preset, spec in PRESETS.items():
        shapes = [(b, c + warmup + steps) for b in spec["batch"] for c in spec["contexts"]]
        for dtype in dtypes:
            for t in attention_names():
                overrides = [*spec["overrides"], "model.num_layers=1", f"attention={t}"]
                for (batch, length), launches in capture_launches(overrides, shapes, DTYPES[dtype]).items():
                    cases += [Case(f"{preset} {t} {dtype} b{batch} ctx{length - warmup - steps}", launch, dtype)
                              for launch in launches]
    for name, overrides in WIDE_HEADS.items():
        for launch in capture_launches(overrides, [(32, 4096)], torch.bfloat16)[32, 4096]:
            cases.append(Case(f"{name} bf16 b32 ctx4096", launch, "bf16"))
    return cases


def check(cases: list[Case], targets) -> list[Resources]:
    return [compile_case(case, target) for case in unique(cases) for target in targets]


def table(rows: list[Resources]) -> str:
    lines = ["| case | target | registers | spills (bytes) | shared memory (KB) | fits |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r.case} | {r.target} | {r.registers} | {r.spill_bytes} | "
                     f"{r.shared_bytes / 1024:.1f} of {r.shared_limit / 1024:.0f} | {'yes' if r.fits else 'NO'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from pretrain import distributed
    from pretrain.config import ParallelConfig

    distributed.init(ParallelConfig(backend="gloo"))
    try:
        rows = check(preset_cases(), args.targets)
    finally:
        distributed.shutdown()
    print(json.dumps([asdict(r) | {"ok": r.ok} for r in rows], indent=2) if args.json else table(rows))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
