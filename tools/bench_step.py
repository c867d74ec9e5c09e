"""Time keel's training step against an equivalent plain-PyTorch GPT, in one process.

    python tools/bench_step.py [--steps N] [--device cpu|cuda] [hydra overrides ...]

Prints ms per step for keel (megatron GPTModel + DDP + schedule + megatron optimizer) and for a
plain-PyTorch GPT of the same shapes (RMSNorm, RoPE, GQA on SDPA, SwiGLU, tied embeddings, AdamW,
clipping), their ratio, the data loader's time per global batch against the step, the stability
monitors' cost (a monitored step against a plain one, and amortised over their default interval),
and on a GPU tokens/s and MFU.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
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


def plain_step_fn(cfg, vocab: int, device, dtype):
    m = cfg.model
    model = PlainGPT(vocab, m.hidden_size, m.num_layers, m.heads, cfg.attention.query_groups(cfg.model.heads), m.ffn_size,
                     cfg.data.seq_len).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=device.type == "cuda")
    g, mb = cfg.trainer.global_batch_size, cfg.trainer.micro_batch_size
    tokens = torch.randint(0, vocab, (mb, cfg.data.seq_len), device=device)

    def step():
        for _ in range(g // mb):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = model(tokens, tokens) / (g // mb)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("overrides", nargs="*", help="hydra overrides (default: +experiment=demo)")
    args = ap.parse_args(argv)
    from pretrain import distributed
    from pretrain.config import compose_config
    from pretrain.run import build_trainer, precision

    overrides = args.overrides or ["+experiment=demo"]
    cfg = compose_config(overrides + ["trainer.progress=false", "logging.tensorboard=false", "logging.plot=false",
                                      "logging.monitors.interval=0"])
    world = distributed.init(cfg.parallel)
    sync = torch.cuda.synchronize if world.device.type == "cuda" else (lambda: None)
    dtype = precision(cfg, world)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(cfg, world, Path(tmp))
        built = trainer.parts.model
        keel_ms = _median_ms(trainer.train_step, args.steps, args.warmup, sync)
        vocab = built.gpt.vocab_size
        plain_ms = _median_ms(plain_step_fn(cfg, vocab, world.device, dtype), args.steps, args.warmup, sync)
        loader_ms = _median_ms(trainer.loader.next_global_batch, args.steps, 1, lambda: None)
        interval, off_ms, on_ms = _monitor_cost(trainer, built.gpt, max(args.steps, 8), sync)
    tokens = cfg.trainer.global_batch_size * cfg.data.seq_len
    print(f"model: {built.num_params / 1e6:.1f}M params, {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, "
          f"seq {cfg.data.seq_len}, global batch {cfg.trainer.global_batch_size}, {world.device}, {dtype}")
    print(f"keel step          {keel_ms:9.1f} ms   ({tokens / keel_ms * 1e3:,.0f} tokens/s)")
    print(f"plain PyTorch step {plain_ms:9.1f} ms   ({tokens / plain_ms * 1e3:,.0f} tokens/s)")
    print(f"ratio keel/plain   {keel_ms / plain_ms:9.3f}")
    print(f"data loader        {loader_ms:9.2f} ms per global batch = {loader_ms / keel_ms:.2%} of the step")
    print(f"monitored step     {on_ms:9.1f} ms vs {off_ms:.1f} ms = {(on_ms - off_ms) / off_ms:+.1%} on the steps it runs; "
          f"every {interval} steps (default): {(on_ms - off_ms) / (interval * off_ms):+.2%} of step time")
    if world.device.type == "cuda":
        from pretrain.trainer import peak_flops

        mfu = tokens * built.flops_per_token(cfg.data.seq_len) / (keel_ms / 1e3) / peak_flops(world.device)
        print(f"MFU (keel)         {mfu:9.2%}  of {peak_flops(world.device) / 1e12:.0f} TFLOP/s bf16 peak")
    distributed.shutdown()


def _monitor_cost(trainer, gpt, steps: int, sync) -> tuple[int, float, float]:
    """The stability monitors' default interval and the median ms of plain and monitored steps.

    Plain and monitored steps alternate, so drift in the machine's speed hits both alike; the
    monitor's share of step time at interval k is then (monitored - plain) / (k * plain)."""
    from pretrain.config import MonitorConfig
    from pretrain.callbacks.stability import StabilityMonitor

    monitor = StabilityMonitor(gpt, MonitorConfig(interval=1))
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
    return MonitorConfig().interval, statistics.median(plain), statistics.median(monitored)


if __name__ == "__main__":
    main()
