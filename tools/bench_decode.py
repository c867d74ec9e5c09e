"""Decode throughput vs context length for every attention type, at matched parameter counts.

    python tools/bench_decode.py [--contexts 256 1024 4096 8192] [--batch 8] [--steps 16]
                                 [--device cuda --dtype bf16] [--json] [-- HYDRA_OVERRIDES ...]

Each type's FFN is widened so that all types have the parameter count of the largest (as the papers
match models). For every context length the KV cache is filled with random values up to that length
(the content does not change the cost) and `--steps` single-token decode steps are timed after a
warm-up; tokens/s = batch / median step time (CPU time of the single-threaded process on CPU, the
synchronised wall clock on CUDA). Ratios are to GQA at the same context.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pretrain import cpu_compat  # noqa: F401  (silences megatron's import warnings)

TYPES = ("mha", "gqa", "mqa", "gta", "gla", "mla")
VOCAB = 8192


def attention_params(gpt) -> int:
    return sum(p.numel() for layer in gpt.decoder.layers for p in layer.self_attention.parameters())


def matched_models(overrides: list[str], types, device, dtype) -> dict:
    """{type: (gpt, total params)} with each FFN widened to the largest attention's parameter count."""
    from models.inference import build_for_decode
    from pretrain.config import compose_config

    cfgs = {t: compose_config([*overrides, f"attention={t}"]) for t in types}
    attn = {t: attention_params(build_for_decode(c.model, c.attention, 256, c.seed)) for t, c in cfgs.items()}
    target = max(attn.values())
    models = {}
    for t, cfg in cfgs.items():
        m = cfg.model
        per_unit = (3 if m.activation == "swiglu" else 2) * m.hidden_size * m.num_layers  # params per FFN unit
        cfg.model.ffn_hidden_size = m.ffn_size + round((target - attn[t]) / per_unit)
        gpt = build_for_decode(cfg.model, cfg.attention, VOCAB, cfg.seed, device, dtype)
        models[t] = (gpt, sum(p.numel() for p in gpt.parameters()))
    return models


@torch.no_grad()
def tokens_per_s(gpt, context: int, batch: int, steps: int, warmup: int = 2) -> dict:
    """Median over single-token steps: wall-clock tokens/s, and on CPU also tokens per CPU-second.

    On a shared CPU the wall clock measures the neighbours too; the process's CPU time (one thread)
    does not, so `cpu` is the number to compare there. On CUDA only the (synchronised) wall clock counts.
    """
    from models.inference import forward_cached, new_cache

    cache = new_cache(gpt, batch, context + warmup + steps)
    for layer in cache.layers:
        for buf in layer.values():
            buf.normal_()
    cache.length = context
    tok = torch.zeros(batch, 1, dtype=torch.long, device=next(gpt.parameters()).device)
    sync = torch.cuda.synchronize if tok.is_cuda else (lambda: None)
    for _ in range(warmup):
        forward_cached(gpt, tok, cache)
    walls, cpus = [], []
    for _ in range(steps):
        sync()
        w, c = time.perf_counter(), time.process_time()
        forward_cached(gpt, tok, cache)
        sync()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return {"wall": batch / statistics.median(walls),
            "cpu": None if tok.is_cuda else batch / max(statistics.median(cpus), 1e-9)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096, 8192])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--types", nargs="+", default=list(TYPES), choices=TYPES)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for the model (default conf/model/small)")
    args = p.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]

    from models.inference import new_cache
    from pretrain import distributed
    from pretrain.config import ParallelConfig

    key = "cpu" if args.device == "cpu" else "wall"
    if args.device == "cpu":
        torch.set_num_threads(1)  # so CPU time is compute time
    distributed.init(ParallelConfig(backend="gloo"))
    try:
        max_ctx = max(args.contexts)
        overrides = [f"model.max_seq_len={max(max_ctx + args.steps + 2, 2048)}", *args.overrides]
        models = matched_models(overrides, args.types, args.device, dtype)
        rows = []
        for t, (gpt, params) in models.items():
            kv_bytes = new_cache(gpt, 1, 1, dtype).bytes_per_token() * len(gpt.decoder.layers)
            for ctx in args.contexts:
                speed = tokens_per_s(gpt, ctx, args.batch, args.steps)
                rows.append({"attention": t, "context": ctx, "tokens_per_s": speed[key], "wall_tokens_per_s": speed["wall"],
                             "params": params, "kv_bytes_per_token": kv_bytes, "batch": args.batch,
                             "device": args.device, "dtype": str(dtype).replace("torch.", "")})
    finally:
        distributed.shutdown()
    base = {r["context"]: r["tokens_per_s"] for r in rows if r["attention"] == "gqa"}
    for r in rows:
        r["ratio_to_gqa"] = r["tokens_per_s"] / base[r["context"]] if r["context"] in base else None
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"tokens/s = {'per CPU-second, one thread' if key == 'cpu' else 'wall clock'}; batch {args.batch}, "
          f"median of {args.steps} steps, {rows[0]['dtype']} on {args.device}")
    print("| attention | params | KV bytes/token (all layers) | " + " | ".join(f"ctx {c}" for c in args.contexts) + " |")
    print("|---" * (3 + len(args.contexts)) + "|")
    for t in models:
        cells = [r for r in rows if r["attention"] == t]
        perf = " | ".join(f"{r['tokens_per_s']:.0f} tok/s" + (f" ({r['ratio_to_gqa']:.2f}x)" if r["ratio_to_gqa"] else "")
                          for r in cells)
        print(f"| {t} | {cells[0]['params']:,} | {cells[0]['kv_bytes_per_token']} | {perf} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
