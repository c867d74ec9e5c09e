"""Time keel's training step against an equivalent plain-PyTorch GPT, eager and compiled, in one process.

    python tools/bench_step.py [--preset cpu|demo|286M|755M|1.5B] [--steps N] [hydra overrides ...]

Prints, for keel (megatron GPTModel + DDP + schedule + megatron optimizer, with the speed options its
config selects) and for a plain-PyTorch GPT of the same shapes (RMSNorm, RoPE, GQA on SDPA, SwiGLU, tied
embeddings, fused AdamW, clipping) run eagerly and under torch.compile: ms per step, tokens/s, MFU (on a
GPU the peak table of pretrain/mfu.py knows) and peak GPU memory. The headline is keel / compiled plain.
Then the data loader's time per global batch against the step, and the stability monitors' cost (a
monitored step against a plain one, and amortised over their default interval).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain import cpu_compat  # noqa: F401


class PlainBlock(nn.Module):
    def __init__(self, h: int, heads: int, kv: int, ffn: int):
        super().__init__()
        self.heads, self.kv, self.d = heads, kv, h // heads
        self.norm1, self.norm2 = nn.RMSNorm(h, eps=1e-5), nn.RMSNorm(h, eps=1e-5)
        self.qkv = nn.Linear(h, (heads + 2 * kv) * self.d, bias=False)
        self.proj = nn.Linear(heads * self.d, h, bias=False)
        self.fc1 = nn.Linear(h, 2 * ffn, bias=False)
        self.fc2 = nn.Linear(ffn, h, bias=False)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).split([self.heads * self.d, self.kv * self.d, self.kv * self.d], -1)
        q, k, v = (t.view(b, s, -1, self.d).transpose(1, 2) for t in (q, k, v))
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, -1))
        gate, up = self.fc1(self.norm2(x)).chunk(2, -1)
        return x + self.fc2(F.silu(gate) * up)


def _rope(x, cos, sin):
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


class PlainGPT(nn.Module):
    def __init__(self, vocab, h, layers, heads, kv, ffn, seq):
        super().__init__()
        self.emb = nn.Embedding(vocab, h)
        self.blocks = nn.ModuleList(PlainBlock(h, heads, kv, ffn) for _ in range(layers))
        self.norm = nn.RMSNorm(h, eps=1e-5)
        d = h // heads
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
        freqs = torch.outer(torch.arange(seq).float(), inv)
        freqs = torch.cat([freqs, freqs], -1)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, tokens, labels):
        x = self.emb(tokens)
        for blk in self.blocks:
            x = blk(x, self.cos.to(x.dtype), self.sin.to(x.dtype))
        logits = self.norm(x) @ self.emb.weight.t()
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def _median_ms(fn, steps: int, warmup: int, sync) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def plain_step_fn(cfg, vocab: int, device, dtype, compiled: bool):
    """One training step of the plain GPT: fp32 parameters, autocast, fused AdamW on a GPU; `compiled`
    compiles the whole model (what a plain-PyTorch user would do)."""
    m = cfg.model
    model = PlainGPT(vocab, m.hidden_size, m.num_layers, m.heads, cfg.attention.query_groups(cfg.model.heads), m.ffn_size,
                     cfg.data.seq_len).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=device.type == "cuda")
    forward = torch.compile(model) if compiled else model
    g, mb = cfg.trainer.global_batch_size, cfg.trainer.micro_batch_size
    tokens = torch.randint(0, vocab, (mb, cfg.data.seq_len), device=device)

    def step():
        for _ in range(g // mb):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = forward(tokens, tokens) / (g // mb)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


# named shapes (hydra overrides over the demo): the two of issue 13's measurements and one of about 1.5B
# parameters that fits one 141 GB GPU with bf16 weights, fp32 main parameters and Adam state (~18 bytes
# a parameter, 27 GB, leaving room for activations); "cpu" is small enough for CI
PRESETS: dict[str, list[str]] = {
    "cpu": ["+experiment=smoke", "trainer.global_batch_size=8", "trainer.micro_batch_size=4"],
    "demo": ["+experiment=demo"],
    "286M": ["+experiment=demo", "model.num_layers=24", "model.hidden_size=1024", "model.head_dim=64",
             "model.max_seq_len=1024", "data.seq_len=1024", "trainer.global_batch_size=16", "trainer.micro_batch_size=8"],
    "755M": ["+experiment=demo", "model.num_layers=16", "model.hidden_size=2048", "model.head_dim=128",
             "model.max_seq_len=2048", "data.seq_len=2048", "trainer.global_batch_size=16", "trainer.micro_batch_size=4"],
    "1.5B": ["+experiment=demo", "model.num_layers=32", "model.hidden_size=2048", "model.head_dim=128",
             "model.max_seq_len=2048", "data.seq_len=2048", "trainer.global_batch_size=16", "trainer.micro_batch_size=4"],
}


@dataclass
class Timing:
    name: str
    ms: float
    peak_bytes: int | None  # peak GPU memory of its build and steps; None on CPU


def _timed(name: str, build, steps: int, warmup: int, device) -> Timing:
    """Median ms of the step `build()` returns, and the peak GPU memory above what was held before the
    build (another model still held does not count)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    held = torch.cuda.memory_allocated(device) if cuda else 0
    ms = _median_ms(build(), steps, warmup, torch.cuda.synchronize if cuda else (lambda: None))
    return Timing(name, ms, torch.cuda.max_memory_allocated(device) - held if cuda else None)


def _row(t: Timing, tokens: int, flops_per_token: float, device) -> str:
    from pretrain.mfu import mfu

    tps = tokens / t.ms * 1e3
    utilisation = mfu(tps, flops_per_token, device)
    mfu_text = f"{utilisation:6.1%}" if utilisation is not None else "     -"
    mem = f"{t.peak_bytes / 2**30:7.1f} GiB" if t.peak_bytes is not None else "        -"
    return f"{t.name:<20} {t.ms:9.1f} ms {tps:12,.0f} tokens/s   MFU {mfu_text}   peak {mem}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=list(PRESETS), help="named shapes (default: demo, unless overrides are given)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("overrides", nargs="*", help="hydra overrides after the preset's")
    args = ap.parse_args(argv)
    from pretrain import distributed
    from pretrain.config import compose_config
    from pretrain.run import precision

    base = PRESETS[args.preset] if args.preset else ([] if args.overrides else PRESETS["demo"])
    cfg = compose_config(base + args.overrides + [
        "trainer.progress=false", "logging.tensorboard=false", "logging.plot=false", "logging.monitors.interval=0"])
    world = distributed.init(cfg.parallel)
    device, dtype = world.device, precision(cfg, world)
    # 1. keel's step, its loader and its monitors; then keel's model and optimizer are freed, so that the
    #    baselines get the memory keel held (at 1.5B about 27 GB, with a plain model of about 24 GB to come)
    keel, shape, loader_ms, monitor = _keel_figures(cfg, world, args)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    held = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    # 2. the plain models, each built in its own timing and freed after it
    timings = [_timed(name, lambda c=compiled: plain_step_fn(cfg, shape["vocab"], device, dtype, c), args.steps,
                      args.warmup, device) for name, compiled in (("plain eager", False), ("plain compiled", True))]
    tokens = cfg.trainer.global_batch_size * cfg.data.seq_len
    print(f"model: {shape['params'] / 1e6:.1f}M params ({shape['active'] / 1e6:.1f}M active), "
          f"{cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, seq {cfg.data.seq_len}, global batch "
          f"{cfg.trainer.global_batch_size}, micro-batch {cfg.trainer.micro_batch_size}, {device}, {dtype}, "
          f"keel layers {'compiled' if shape['compiled'] else 'eager'}, torch {torch.__version__}")
    for t in (keel, *timings):
        print(_row(t, tokens, shape["flops"], device))
    eager, compiled = timings
    interval, off_ms, on_ms = monitor
    print(f"ratio keel/compiled {keel.ms / compiled.ms:9.3f}   (headline; keel/eager {keel.ms / eager.ms:.3f})")
    print(f"data loader        {loader_ms:9.2f} ms per global batch = {loader_ms / keel.ms:.2%} of the step")
    print(f"monitored step     {on_ms:9.1f} ms vs {off_ms:.1f} ms = {(on_ms - off_ms) / off_ms:+.1%} on the steps it runs; "
          f"every {interval} steps (default): {(on_ms - off_ms) / (interval * off_ms):+.2%} of step time")
    print(f"keel freed before the baselines: {shape['freed']}"
          + (f" (GPU memory still allocated: {held / 2**30:.2f} GiB)" if held is not None else ""))
    if args.json:
        from pretrain.mfu import mfu

        rows = {t.name: {"ms": t.ms, "tokens_per_s": tokens / t.ms * 1e3, "peak_bytes": t.peak_bytes,
                         "mfu": mfu(tokens / t.ms * 1e3, shape["flops"], device)} for t in (keel, *timings)}
        args.json.write_text(json.dumps({"preset": args.preset, "device": str(device), "dtype": str(dtype),
                                         "params": shape["params"], "steps": rows,
                                         "ratio_keel_to_compiled": keel.ms / compiled.ms,
                                         "loader_share": loader_ms / keel.ms,
                                         "monitor_share_at_default_interval": (on_ms - off_ms) / (interval * off_ms),
                                         "torch": torch.__version__}, indent=2))
    distributed.shutdown()


def _keel_figures(cfg, world, args) -> tuple[Timing, dict, float, tuple[int, float, float]]:
    """keel's step timing, its shapes, the loader's ms per global batch and the monitors' cost, measured
    on one trainer that is gone (weakly referenced, checked) when this returns."""
    from pretrain.run import build_trainer

    device = world.device
    with tempfile.TemporaryDirectory() as tmp:
        trainers = []

        def build_keel():
            trainers.append(build_trainer(cfg, world, Path(tmp)))
            return trainers[0].train_step

        keel = _timed("keel", build_keel, args.steps, args.warmup, device)
        trainer = trainers.pop()
        built = trainer.parts.built
        shape = {"vocab": built.gpt.vocab_size, "params": built.num_params, "active": built.active_params,
                 "flops": built.flops_per_token(cfg.data.seq_len), "compiled": bool(trainer.compiled)}
        loader_ms = _median_ms(trainer.loader.next_global_batch, args.steps, 1, lambda: None)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        monitor = _monitor_cost(trainer, trainer.model, max(args.steps, 8), sync)
        alive = weakref.ref(trainer)
        del trainer, built
        gc.collect()
        shape["freed"] = "yes" if alive() is None else "NO (still referenced)"
    return keel, shape, loader_ms, monitor


def _monitor_cost(trainer, model, steps: int, sync) -> tuple[int, float, float]:
    """The stability monitors' default interval and the median ms of plain and monitored steps.

    Plain and monitored steps alternate, so drift in the machine's speed hits both alike; the
    monitor's share of step time at interval k is then (monitored - plain) / (k * plain)."""
    from pretrain.callbacks.stability import StabilityConfig, StabilityMonitor

    monitor = StabilityMonitor(model, StabilityConfig(interval=1))
    plain, monitored = [], []
    for i in range(2 * steps + 2):
        trainer.callbacks = {"stability": monitor} if i % 2 else {}
        sync()
        t = time.perf_counter()
        trainer.train_step()
        for c in trainer.callbacks.values():  # the monitor computes in on_step_end
            c.on_step_end(trainer, {"step": trainer.step})
        sync()
        if i >= 2:  # the first pair warms the monitor's buffers up
            (monitored if i % 2 else plain).append((time.perf_counter() - t) * 1e3)
    trainer.callbacks = {}
    return StabilityConfig().interval, statistics.median(plain), statistics.median(monitored)


if __name__ == "__main__":
    main()
