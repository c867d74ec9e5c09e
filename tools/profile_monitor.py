"""Where a monitored training step's time goes, part by part, and the SVD choices for W_qᵀW_k cores.

    python tools/profile_monitor.py [hydra overrides ...]   (default: +experiment=demo)

`tools/gpu_check.sh` runs it on the 286M model of BENCHMARKS.md.

Wraps each part of the stability monitor with a device sync on both sides, runs six monitored steps
and prints the mean per part over the last four; then times the SVD of 384 cores of 64×64 (fp64, one
per layer and head of that model) on the device's default solver, on the host, with cuSOLVER's
batched `gesvda` driver (CUDA only) and as `eigvalsh` of the Gram matrix.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from pretrain import cpu_compat  # noqa: F401

MONITOR_METHODS = ("on_before_update", "on_step_end", "_attention_stats", "_matrix_stats", "_logit_stats")
MONITOR_FUNCTIONS = ("qk_spectral_stats", "attention_entropy_from_scores", "_summarise", "_param_norm")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _instrument(times: dict) -> None:
    from pretrain.callbacks import stability

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            _sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            _sync()
            times[name].append((time.perf_counter() - start) * 1e3)
            return out
        return wrapper

    for target, names in ((stability.StabilityMonitor, MONITOR_METHODS), (stability, MONITOR_FUNCTIONS)):
        for name in names:
            setattr(target, name, timed(name, getattr(target, name)))


def profile_monitor(overrides: list[str], steps: int = 6, warmup: int = 2) -> None:
    from pretrain import distributed
    from pretrain.config import compose_config
    from pretrain.callbacks.stability import StabilityConfig, StabilityMonitor
    from pretrain.run import build_trainer

    times: dict[str, list[float]] = defaultdict(list)
    _instrument(times)
    cfg = compose_config([*overrides, "trainer.progress=false", "logging.tensorboard=false",
                          "logging.plot=false", "logging.monitors.interval=0"])
    world = distributed.init(cfg.parallel)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(cfg, world, Path(tmp))
        monitor = StabilityMonitor(trainer.model, StabilityConfig(interval=1))
        trainer.callbacks = {"stability": monitor}
        step_ms = []
        for i in range(steps):
            if i == warmup:
                times.clear()
            _sync()
            start = time.perf_counter()
            trainer.train_step()
            monitor.on_step_end(trainer, {"step": trainer.step})  # the trainer's loop would call it
            _sync()
            step_ms.append((time.perf_counter() - start) * 1e3)
    distributed.shutdown()
    measured = steps - warmup
    print(f"{trainer.parts.built.num_params / 1e6:.1f}M params on {world.device}: monitored step "
          f"{sorted(step_ms[warmup:])[measured // 2]:.1f} ms (median of {measured})")
    for name, ms in sorted(times.items(), key=lambda kv: -sum(kv[1])):
        print(f"  {name:30s} {sum(ms) / measured:8.2f} ms per monitored step ({len(ms) // measured} calls)")


def profile_core_svd(device: torch.device, cores: int = 384, size: int = 64, repeats: int = 3) -> None:
    core = torch.randn(cores, size, size, dtype=torch.float64, device=device)
    ways = {"default solver": lambda: torch.linalg.svdvals(core),
            "on the host": lambda: torch.linalg.svdvals(core.cpu()).to(device),
            "eigvalsh of the Gram": lambda: torch.linalg.eigvalsh(core @ core.mT)}
    if device.type == "cuda":
        ways["gesvda (batched)"] = lambda: torch.linalg.svd(core, full_matrices=False, driver="gesvda")[1]
    for name, fn in ways.items():
        fn()
        _sync()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        _sync()
        print(f"SVD of {cores} {size}x{size} fp64 cores, {name:22s} {(time.perf_counter() - start) / repeats * 1e3:8.1f} ms")


if __name__ == "__main__":
    profile_monitor(sys.argv[1:] or ["+experiment=demo"])
    profile_core_svd(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
