"""How long a checkpoint holds training up, written synchronously or in the background (checkpoint.async_save).

    python tools/bench_checkpoint.py [--saves N] [hydra overrides ...]     # default: +experiment=demo

For each way it alternates a plain step with a step, a save and `--after` more steps, and reports the
median time the save adds: for a synchronous save the whole write; for a background save the snapshot
taken before training goes on, whatever the writer's work slows the next steps down, and any wait for
it to be published at the end. The checkpoints are verified against their manifests.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def _waits(trainer, saves: int, after: int, sync) -> tuple[float, float]:
    """(median plain step ms, median ms that a save adds to its step and the `after` steps that follow,
    by which time a background save must be published)."""
    plain, extra = [], []
    for _ in range(saves):
        sync()
        t = time.perf_counter()
        trainer.train_step()
        sync()
        plain.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        trainer.train_step()
        trainer.save_checkpoint()
        for _ in range(after):  # steps during which a background writer works
            trainer.train_step()
            trainer.checkpoints.poll()
        trainer.checkpoints.wait()
        sync()
        extra.append((time.perf_counter() - t) * 1e3 - (1 + after) * plain[-1])
    return statistics.median(plain), statistics.median(extra)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--saves", type=int, default=3)
    ap.add_argument("--after", type=int, default=4, help="steps a background save may take to be published")
    ap.add_argument("overrides", nargs="*", help="hydra overrides (default: +experiment=demo)")
    args = ap.parse_args(argv)
    import torch

    from pretrain import checkpoint, distributed
    from pretrain.config import compose_config
    from pretrain.run import build_trainer

    base = (args.overrides or ["+experiment=demo"]) + ["trainer.progress=false", "logging.tensorboard=false",
                                                       "logging.plot=false", "logging.monitors.interval=0",
                                                       "checkpoint.keep_last=1"]
    results = {}
    for mode in ("false", "true"):
        cfg = compose_config(base + [f"checkpoint.async_save={mode}"])
        world = distributed.init(cfg.parallel)
        sync = torch.cuda.synchronize if world.device.type == "cuda" else (lambda: None)
        with tempfile.TemporaryDirectory() as tmp:
            trainer = build_trainer(cfg, world, Path(tmp))
            trainer.train_step()  # warm up
            results[mode] = _waits(trainer, args.saves, args.after, sync)
            newest = checkpoint.latest(Path(tmp) / "checkpoints")
            assert checkpoint.verify(newest) is None, "a benchmarked checkpoint failed verification"
            size = sum(p.stat().st_size for p in newest.rglob("*") if p.is_file())
        distributed.shutdown()
    plain, sync_ms = results["false"]
    _, async_ms = results["true"]
    print(f"checkpoint of {size / 2**20:.1f} MiB on {world.device}; plain step {plain:.1f} ms (median of {args.saves})")
    print(f"synchronous save holds training up   {sync_ms:9.1f} ms")
    print(f"background save holds training up    {async_ms:9.1f} ms   ({sync_ms / max(async_ms, 1e-3):.1f}x less)")


if __name__ == "__main__":
    main()
