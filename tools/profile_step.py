"""Where keel's training step spends its time, from torch.profiler: the evidence for closing the gap to
compiled plain PyTorch (tools/bench_step.py measures the gap itself).

    python tools/profile_step.py [--preset cpu|demo|286M|755M|1.5B] [--steps 3] [--warmup 3] [--json PATH]
                                 [hydra overrides ...]

After `--warmup` untimed steps (compilation happens there) it profiles `--steps` training steps and prints:
- the top kernels by GPU time (on CPU: the top operators by their own CPU time), each with its share;
- on a GPU, its idle time between kernels: the span of the profiled steps less the union of kernel
  intervals, which is launch overhead, host work and waiting on the host;
- host syncs per step: calls that make the host wait for the device (`aten::_local_scalar_dense`, the op
  behind `.item()`, `.tolist()` and `bool(tensor)`, and CUDA's stream, event and device synchronisations).
`--json` writes the same as a dict (tools/gpu_check.sh's triage collects it).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from pretrain import cpu_compat  # noqa: F401  (silences megatron's import warnings)

# what makes the host wait for the device
SYNC_EVENTS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
# torch's SDPA backends, by the operator each dispatches to
SDPA_BACKENDS = {"aten::_scaled_dot_product_flash_attention": "flash",
                 "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
                 "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
                 "aten::_scaled_dot_product_cudnn_attention": "cuDNN",
                 "aten::_scaled_dot_product_attention_math": "math"}


def sdpa_backends(fn) -> list[str]:
    """The SDPA backends `fn()` dispatches to, in order of first use (operators, so CPU activity suffices)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    seen = [SDPA_BACKENDS[e.name] for e in prof.events() if e.name in SDPA_BACKENDS]
    return list(dict.fromkeys(seen))


def summarise(prof, steps: int, cuda: bool, top: int = 12) -> dict:
    """Top kernels (or CPU operators), GPU idle time and host syncs per step, from a finished profile."""
    events = prof.events()
    syncs = defaultdict(int)
    for e in events:
        if e.name in SYNC_EVENTS:
            syncs[e.name] += 1
    out = {"steps": steps, "device": "cuda" if cuda else "cpu",
           "host_syncs_per_step": sum(syncs.values()) / steps,
           "host_syncs_by_kind": {k: v / steps for k, v in sorted(syncs.items())}}
    if cuda:
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        times = defaultdict(float)
        for e in kernels:
            times[e.name] += e.time_range.elapsed_us()
        total = sum(times.values())
        busy, span = _busy_and_span([(e.time_range.start, e.time_range.end) for e in kernels])
        out |= {"gpu_ms_per_step": total / 1e3 / steps, "span_ms_per_step": span / 1e3 / steps,
                "gpu_idle_ms_per_step": (span - busy) / 1e3 / steps,
                "gpu_idle_share": (span - busy) / span if span else None, "kernels_per_step": len(kernels) / steps}
    else:
        times = defaultdict(float)
        for e in prof.key_averages():
            times[e.key] += e.self_cpu_time_total
        total = sum(times.values())
    ranked = sorted(times.items(), key=lambda kv: -kv[1])[:top]
    out["top"] = [{"name": name, "ms_per_step": t / 1e3 / steps, "share": t / total if total else None}
                  for name, t in ranked]
    return out


def _busy_and_span(intervals: list[tuple[float, float]]) -> tuple[float, float]:
    """The union length of the intervals and the span from the first start to the last end."""
    if not intervals:
        return 0.0, 0.0
    intervals.sort()
    busy, (lo, hi) = 0.0, intervals[0]
    for start, end in intervals[1:]:
        if start > hi:
            busy, lo = busy + hi - lo, start
        hi = max(hi, end)
    return busy + hi - lo, hi - intervals[0][0]


def profile_steps(trainer, steps: int, warmup: int, cuda: bool) -> dict:
    for _ in range(warmup):
        trainer.train_step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            trainer.train_step()
        if cuda:
            torch.cuda.synchronize()
    return summarise(prof, steps, cuda)


def markdown(summary: dict) -> str:
    unit = "kernel" if summary["device"] == "cuda" else "operator (own CPU time)"
    lines = [f"| {unit} | ms per step | share |", "|---|---:|---:|"]
    lines += [f"| `{t['name'][:90]}` | {t['ms_per_step']:.2f} | {t['share']:.1%} |" for t in summary["top"]]
    lines.append("")
    if summary["device"] == "cuda":
        lines.append(f"GPU busy {summary['gpu_ms_per_step']:.1f} ms per step over a span of "
                     f"{summary['span_ms_per_step']:.1f} ms: idle {summary['gpu_idle_ms_per_step']:.1f} ms "
                     f"({summary['gpu_idle_share']:.1%}); {summary['kernels_per_step']:.0f} kernels per step.")
    kinds = ", ".join(f"{k} {v:g}" for k, v in summary["host_syncs_by_kind"].items()) or "none"
    lines.append(f"Host syncs per step: {summary['host_syncs_per_step']:g} ({kinds}).")
    return "\n".join(lines)


def main(argv=None) -> None:
    from tools.bench_step import PRESETS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=list(PRESETS), help="named shapes (default: demo, unless overrides are given)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="also write the summary here")
    ap.add_argument("overrides", nargs="*", help="hydra overrides after the preset's")
    args = ap.parse_args(argv)
    from pretrain import distributed
    from pretrain.config import compose_config
    from pretrain.run import build_trainer

    base = PRESETS[args.preset] if args.preset else ([] if args.overrides else PRESETS["demo"])
    cfg = compose_config(base + args.overrides + ["trainer.progress=false", "logging.tensorboard=false",
                                                  "logging.plot=false", "logging.monitors.interval=0"])
    world = distributed.init(cfg.parallel)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            trainer = build_trainer(cfg, world, Path(tmp))
            summary = profile_steps(trainer, args.steps, args.warmup, world.device.type == "cuda")
    finally:
        distributed.shutdown()
    summary["preset"] = args.preset
    print(markdown(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
