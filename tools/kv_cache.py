"""KV-cache size per token per layer for every attention type, measured from the real cache tensors.

    python tools/kv_cache.py [--tp 1 2 4] [--dtype bf16] [--json] [HYDRA_OVERRIDES ...]
    python tools/kv_cache.py --verify [--attention gla] [--tp 2] [--length 64] [--tol 1e-3] [--kernel triton]
                             [HYDRA_OVERRIDES ...]

The first form builds each type's model (one layer) in a gloo world of N processes per TP size, allocates
the decode cache from this rank's real modules (models/inference) and reports rank 0's elements and
bytes next to the formula. `--verify` decodes a random sequence token by token with the cache, at TP=N
in a gloo world of N processes, and compares the gathered logits with one full forward at TP=1 (every
type unless --attention is given); it exits 1 when the largest difference exceeds --tol. `--kernel triton`
(or sdpa) decodes the one-token steps with that decode kernel (on CPU: TRITON_INTERPRET=1 in the environment).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from pretrain import cpu_compat  # noqa: F401  (first: megatron-core imported the keel way)
from models.attention import attention_names

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VOCAB = 256


def _configs(overrides: list[str], tp: int, types) -> dict:
    from pretrain.config import compose_config

    out = {}
    for t in types:
        try:
            out[t] = compose_config([*overrides, f"attention={t}", f"parallel.tensor={tp}", "model.num_layers=1"])
        except ValueError as e:
            out[t] = str(e)
    return out


def _rank(rank: int, tp: int, init_file: str, out_file: str, fn, args: tuple) -> None:
    """One rank of a gloo world of `tp` processes with megatron's TP groups; rank 0 saves fn's result."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(tp), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    from pretrain import distributed
    from pretrain.config import ParallelConfig

    distributed.init(ParallelConfig(tensor=tp, backend="gloo"), init_method=f"file://{init_file}")
    try:
        result = fn(tp, *args)
        if rank == 0:
            torch.save(result, out_file)
    finally:
        distributed.shutdown()


def in_tp_world(tp: int, fn, *args):
    """fn(tp, *args) run on every rank of a fresh TP=tp world of processes; rank 0's result."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:  # a file rendezvous: no port to race for
        out = Path(tmp) / "result.pt"
        mp.spawn(_rank, args=(tp, str(Path(tmp) / "store"), str(out), fn, args), nprocs=tp, join=True)
        return torch.load(out)


def _cache_rows(tp: int, overrides: list[str], types, dtype: str) -> dict:
    """This rank's cache elements and bytes per token for each type, checked equal on every rank."""
    import torch.distributed as dist

    from models.inference import build_for_decode, new_cache

    rows = {}
    for t, cfg in _configs(overrides, tp, types).items():
        if isinstance(cfg, str):
            rows[t] = {"error": cfg}
            continue
        try:
            cache = new_cache(build_for_decode(cfg.model, cfg.attention, VOCAB, cfg.seed), batch=1, max_len=1, dtype=DTYPES[dtype])
            rows[t] = {"elements": cache.elements_per_token(), "bytes": cache.bytes_per_token(),
                       "formula": cfg.attention.cache_elements(cfg.model, tp)}
        except ValueError as e:
            rows[t] = {"error": str(e)}
    gathered = [None] * tp
    dist.all_gather_object(gathered, rows)
    for t in rows:  # every rank must hold the same amount
        assert all(g[t] == rows[t] for g in gathered), f"{t}: ranks differ {[g[t] for g in gathered]}"
    return rows


def measure(overrides: list[str], tps, types, dtype: str = "bf16") -> list[dict]:
    results = []
    for tp in tps:
        rows = in_tp_world(tp, _cache_rows, overrides, list(types), dtype)
        results += [{"attention": t, "tp": tp, "dtype": dtype, **rows[t]} for t in types]
    return results


def _logits(overrides: list[str], length: int, cached: bool, kernel="auto") -> torch.Tensor:
    """Logits [1, length, vocab] of a random sequence at this world's TP size, gathered over the TP
    group: token by token with the KV cache, or one full forward."""
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    from models.inference import build_for_decode, forward_cached, new_cache
    from pretrain.config import compose_config

    cfg = compose_config(overrides)
    gpt = build_for_decode(cfg.model, cfg.attention, VOCAB, cfg.seed)
    tokens = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(cfg.seed))
    if cached:
        cache = new_cache(gpt, 1, length, kernel=kernel)
        return torch.cat([forward_cached(gpt, tokens[:, i:i + 1], cache) for i in range(length)], dim=1)
    with torch.no_grad():
        return gather_from_tensor_model_parallel_region(gpt(tokens, torch.arange(length)[None], None)).float()


def _cached_logits(tp: int, runs: dict, length: int, kernel="auto") -> dict:
    return {t: _logits([*o, f"parallel.tensor={tp}"], length, cached=True, kernel=kernel) for t, o in runs.items()}


def verify(types, overrides: list[str], length: int, init_std: float, tp: int = 1, kernel="auto") -> dict[str, float]:
    """Per type, the largest |logit diff| between decoding with the cache at TP=tp and one full
    forward at TP=1 (the same weights: keel's init is seeded by parameter name, not by shard).
    kernel: the cache's decode attention (models.inference.KVCache); on CPU a Triton kernel needs
    TRITON_INTERPRET=1 in the environment."""
    from pretrain import distributed
    from pretrain.config import ParallelConfig

    runs = {t: [*overrides, f"attention={t}", f"model.init_std={init_std}"] for t in types}
    distributed.init(ParallelConfig(backend="gloo"))
    try:
        full = {t: _logits(o, length, cached=False) for t, o in runs.items()}
        cached = {t: _logits(o, length, cached=True, kernel=kernel) for t, o in runs.items()} if tp == 1 else None
    finally:
        distributed.shutdown()
    if tp > 1:
        cached = in_tp_world(tp, _cached_logits, runs, length, kernel)
    return {t: float((cached[t] - full[t]).abs().max()) for t in types}


def _table(rows: list[dict]) -> str:
    tps = sorted({r["tp"] for r in rows})
    head = " | ".join(f"TP={t} elements (formula) / bytes" for t in tps)
    lines = [f"| attention | {head} |", "|---" * (len(tps) + 1) + "|"]
    for t in dict.fromkeys(r["attention"] for r in rows):
        cells = []
        for tp in tps:
            r = next(x for x in rows if x["attention"] == t and x["tp"] == tp)
            cells.append("n/a" if "error" in r else f"{r['elements']} ({r['formula']}) / {r['bytes']}")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=int, nargs="+", help="TP sizes (default 1 2 4; --verify: one size, default 1)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--json", action="store_true")
    p.add_argument("--attention", choices=attention_names())
    p.add_argument("--verify", action="store_true")
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--tol", type=float, default=1e-3, help="absolute, on logits of order 10 (fp32 noise is ~1e-4)")
    p.add_argument("--init-std", type=float, default=0.1, help="--verify: larger than training's, to stress it")
    p.add_argument("--kernel", choices=["auto", "triton", "sdpa", "none"], default="auto",
                   help="--verify: decode attention (auto: Triton on CUDA; on CPU triton/sdpa need TRITON_INTERPRET=1)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. +experiment=attention_quality")
    args = p.parse_args(argv)
    args.tp = args.tp or ([1] if args.verify else [1, 2, 4])
    if args.verify:
        if len(args.tp) != 1:
            p.error("--verify takes one --tp size")
        types = [args.attention] if args.attention else attention_names()
        diffs = verify(types, args.overrides, args.length, args.init_std, args.tp[0],
                       None if args.kernel == "none" else args.kernel)
        for t, diff in diffs.items():
            print(f"{t}: {args.length} tokens decoded with the KV cache at TP={args.tp[0]} vs a full forward at TP=1: "
                  f"max |logit diff| = {diff:.3e} ({'ok' if diff <= args.tol else 'FAIL'}, tolerance {args.tol:g})")
        return 0 if all(d <= args.tol for d in diffs.values()) else 1
    rows = measure(args.overrides, args.tp, [args.attention] if args.attention else attention_names(), args.dtype)
    bad = [r for r in rows if "error" not in r and r["elements"] != r["formula"]]
    print(json.dumps(rows, indent=2) if args.json else _table(rows))
    for r in rows:
        if "error" in r and not args.json:
            print(f"  {r['attention']} at TP={r['tp']}: n/a ({r['error']})")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
