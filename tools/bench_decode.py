"""Decode throughput and memory bandwidth vs context length for every attention type, at matched parameter counts.

    python tools/bench_decode.py [--contexts 256 1024 4096 8192] [--batch 8 [32 ...]] [--steps 16]
                                 [--device cuda --dtype bf16] [--eager] [--json] [--save ROWS.json]
                                 [-- HYDRA_OVERRIDES ...]
    python tools/bench_decode.py --preset memory-bound    # 4 x 2048, 16 heads of 128, batch 32 and 64, 4k-32k

Each type's FFN is widened so that all types have the parameter count of the largest (as the papers
match models). For every batch and context the KV cache is filled with random values up to that length
(the content does not change the cost) and `--steps` single-token decode steps are timed after a
warm-up: on CUDA the step is replayed from a CUDA graph (`--eager`: launched op by op) and attends with
the split-K Triton kernel (`--kernel sdpa`: torch's SDPA for MHA/GQA/MQA); on CPU it is the eager
PyTorch path. tokens/s = batch / median step time
(CPU time of the single-threaded process on CPU, the synchronised wall clock on CUDA).

Bytes per step are what one step must read at least: the filled cache (batch x context x cache bytes
per token) and the weights once (the embedding table only where the output layer shares it). Achieved
bandwidth = bytes / step time; its share of the device's peak HBM bandwidth comes from PEAK_TBPS (an
unknown GPU gets one warning and no share; CPU has none). Ratios are to GQA at the same batch and context.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from pretrain import cpu_compat  # noqa: F401  (first: megatron-core imported the keel way)
from models.attention import attention_names

VOCAB = 8192
# issue 14's shapes: decoding bound by reading the cache; FFNs matched as everywhere here
PRESETS = {"memory-bound": {"overrides": ["model.num_layers=4", "model.hidden_size=2048", "model.head_dim=128"],
                            "contexts": [4096, 8192, 16384, 32768], "batch": [32, 64]}}
# peak HBM bandwidth, TB/s, by device-name fragments (all must appear; first match wins, so specific first)
PEAK_TBPS = [(("h200",), 4.8), (("h100", "pcie"), 2.0), (("h100", "nvl"), 3.9), (("h100",), 3.35), (("h800",), 3.35),
             (("b200",), 8.0), (("a100", "80gb", "pcie"), 1.935), (("a100", "80gb"), 2.039), (("a100",), 1.555),
             (("a10",), 0.6), (("l40",), 0.864), (("l4",), 0.3), (("4090",), 1.008), (("v100",), 0.9)]


def peak_bandwidth(device_name: str | None) -> float | None:
    """Peak HBM bytes/s of a GPU by name; None for the CPU (None) or an unknown GPU (with one warning)."""
    if device_name is None:
        return None
    name = device_name.lower()
    for fragments, tbps in PEAK_TBPS:
        if all(f in name for f in fragments):
            return tbps * 1e12
    print(f"warning: no peak bandwidth known for {device_name!r}; reporting no share of peak", file=sys.stderr)
    return None


def attention_params(gpt) -> int:
    return sum(p.numel() for layer in gpt.decoder.layers for p in layer.self_attention.parameters())


def weight_bytes(gpt) -> int:
    """Parameter bytes one step reads: all, except an embedding table not shared with the output layer
    (a lookup reads only the batch's rows)."""
    total = sum(p.numel() * p.element_size() for p in gpt.parameters())
    if not gpt.share_embeddings_and_output_weights:
        total -= sum(p.numel() * p.element_size() for p in gpt.embedding.parameters())
    return total


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
def step_seconds(gpt, context: int, batch: int, steps: int, graph: bool, kernel="auto", warmup: int = 2) -> dict:
    """Median seconds of single-token steps after `context` cached tokens: wall clock, and on CPU also
    the process's CPU time (one thread), which a shared CPU's neighbours do not inflate."""
    from models.inference import CapturedStep, forward_cached, new_cache

    cache = new_cache(gpt, batch, context + warmup + steps, kernel=kernel)
    for layer in cache.layers:
        for buf in layer.values():
            buf.normal_()
    cache.length = context
    tok = torch.zeros(batch, 1, dtype=torch.long, device=next(gpt.parameters()).device)
    step = CapturedStep(gpt, cache) if graph else (lambda t: forward_cached(gpt, t, cache))
    sync = torch.cuda.synchronize if tok.is_cuda else (lambda: None)
    for _ in range(warmup):
        step(tok)
    walls, cpus = [], []
    for _ in range(steps):
        sync()
        w, c = time.perf_counter(), time.process_time()
        step(tok)
        sync()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return {"wall": statistics.median(walls), "cpu": None if tok.is_cuda else max(statistics.median(cpus), 1e-9),
            "attention_kernel": _attention_kernel(gpt, cache, tok)}


def _attention_kernel(gpt, cache, tok) -> str:
    """What attended in the timed steps: the PyTorch path, the Triton kernel, or torch's SDPA and the
    backend it dispatched to (seen by torch.profiler in one more, eager, step: a graph replay shows no ops)."""
    from models.inference import forward_cached
    from tools.profile_step import sdpa_backends

    if cache.kernel is None:
        return "pytorch"
    cache.lengths -= 1  # the last step again: the cache holds no more than the timed steps
    backends = sdpa_backends(lambda: forward_cached(gpt, tok, cache))
    return "sdpa: " + ", ".join(backends) if backends else "triton"


def measure(gpt, params: int, context: int, batch: int, args, peak: float | None) -> dict:
    """One row: tokens/s, bytes per step (cache, weights), achieved bandwidth and its share of peak."""
    from models.inference import new_cache

    cuda = args.device == "cuda"
    seconds = step_seconds(gpt, context, batch, args.steps, graph=cuda and not args.eager,
                           kernel=args.kernel if cuda or args.kernel == "sdpa" else None)  # SDPA runs on CPU too
    t = seconds["wall" if args.device == "cuda" else "cpu"]
    kv_per_token = new_cache(gpt, 1, 1).bytes_per_token() * len(gpt.decoder.layers)
    cache_b, weight_b = kv_per_token * batch * context, weight_bytes(gpt)
    bandwidth = (cache_b + weight_b) / t
    return {"context": context, "batch": batch, "attention_kernel": seconds["attention_kernel"],
            "tokens_per_s": batch / t, "wall_tokens_per_s": batch / seconds["wall"],
            "step_ms": t * 1e3, "cache_bytes_per_step": cache_b, "weight_bytes_per_step": weight_b,
            "bandwidth_GBps": bandwidth / 1e9, "hbm_share": bandwidth / peak if peak else None,
            "params": params, "kv_bytes_per_token": kv_per_token}


def resolve(args) -> tuple[list[int], list[int], list[str]]:
    """Contexts, batches and model overrides: explicit flags over the preset over the defaults."""
    preset = PRESETS.get(args.preset, {})
    contexts = args.contexts or preset.get("contexts") or [256, 1024, 4096, 8192]
    batches = args.batch or preset.get("batch") or [8]
    return contexts, batches, [*preset.get("overrides", []), *args.overrides]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None)
    p.add_argument("--contexts", type=int, nargs="+", default=None)
    p.add_argument("--batch", type=int, nargs="+", default=None)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--types", nargs="+", default=attention_names(), choices=attention_names())
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--eager", action="store_true", help="on CUDA: no CUDA graph, one launch per op")
    p.add_argument("--kernel", choices=["triton", "sdpa"], default="triton",
                   help="sdpa: torch's SDPA for MHA/GQA/MQA (on CUDA Triton for the others; on CPU only those three); "
                        "triton: on CUDA the split-K kernel, on CPU the PyTorch path")
    p.add_argument("--json", action="store_true")
    p.add_argument("--save", type=Path, default=None,
                   help="write the rows measured so far to this JSON file after each row (a run cut short keeps them)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for the model (default conf/model/small)")
    args = p.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    contexts, batches, overrides = resolve(args)

    from pretrain import distributed
    from pretrain.config import ParallelConfig

    if args.device == "cpu":
        torch.set_num_threads(1)  # so CPU time is compute time
    name = torch.cuda.get_device_name() if args.device == "cuda" else None
    peak = peak_bandwidth(name)
    distributed.init(ParallelConfig(backend="gloo"))
    table = None if args.json else Table(args, name or "cpu", dtype, peak)
    try:
        overrides = [f"model.max_seq_len={max(max(contexts) + args.steps + 2, 2048)}", *overrides]
        models = matched_models(overrides, args.types, args.device, dtype)
        rows = []
        # batch by batch, GQA first: each row's ratio is known when it is printed, and a run cut short
        # by a time limit has printed its first batch whole
        for batch in batches:
            for t in sorted(models, key=lambda t: t != "gqa"):
                for ctx in contexts:
                    rows.append(_row(t, *models[t], ctx, batch, args, peak, rows))
                    rows[-1].update(device=args.device, device_name=name or "cpu",
                                    dtype=str(dtype).replace("torch.", ""))
                    if table:
                        table.print(rows[-1])
                    if args.save:
                        args.save.write_text(json.dumps(rows, indent=2))
    finally:
        distributed.shutdown()
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


def _row(t: str, gpt, params: int, ctx: int, batch: int, args, peak, done: list[dict]) -> dict:
    """One measured row with its ratio to the GQA row of the same batch and context (measured earlier)."""
    try:
        row = {"attention": t, **measure(gpt, params, ctx, batch, args, peak)}
    except torch.OutOfMemoryError:  # e.g. MHA at batch 64 x 32k on an 80 GB GPU
        row = {"attention": t, "context": ctx, "batch": batch, "tokens_per_s": None}
    if args.device == "cuda":
        torch.cuda.empty_cache()
    base = next((r["tokens_per_s"] for r in done + [row]
                 if r["attention"] == "gqa" and (r["batch"], r["context"]) == (batch, ctx)), None)
    row["ratio_to_gqa"] = row["tokens_per_s"] / base if base and row["tokens_per_s"] else None
    return row


class Table:
    """The markdown table, printed a row at a time (flushed, so a log shows progress)."""

    def __init__(self, args, device_name: str, dtype, peak: float | None):
        mode = "per CPU-second, one thread, PyTorch path" if args.device == "cpu" else (
            f"wall clock, {'eager' if args.eager else 'CUDA graph'}, {args.kernel} decode attention")
        print(f"tokens/s {mode}; median of {args.steps} steps, {str(dtype).replace('torch.', '')} on {device_name}"
              + (f" (peak {peak / 1e12:.2f} TB/s)" if peak else ""))
        print("| attention | batch | context | tok/s | vs GQA | cache MB/step | weights MB/step | GB/s "
              "| share of peak | attended by |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|", flush=True)

    @staticmethod
    def print(r: dict) -> None:
        if r["tokens_per_s"] is None:
            print(f"| {r['attention']} | {r['batch']} | {r['context']} | out of memory | | | | | | |", flush=True)
            return
        ratio = f"{r['ratio_to_gqa']:.2f}x" if r["ratio_to_gqa"] else "-"
        share = f"{r['hbm_share']:.0%}" if r["hbm_share"] is not None else "-"
        print(f"| {r['attention']} | {r['batch']} | {r['context']} | {r['tokens_per_s']:,.0f} | {ratio} | "
              f"{r['cache_bytes_per_step'] / 1e6:,.1f} | {r['weight_bytes_per_step'] / 1e6:,.1f} | "
              f"{r['bandwidth_GBps']:,.1f} | {share} | {r['attention_kernel']} |", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
