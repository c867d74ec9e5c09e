"""KV-cache size per token per layer for every attention type, measured from the real cache tensors.

    python tools/kv_cache.py [--tp 1 2 4] [--dtype bf16] [--json] [HYDRA_OVERRIDES ...]
    python tools/kv_cache.py --attention gla --verify [--length 64] [--tol 1e-4] [HYDRA_OVERRIDES ...]

The first form builds each type's model (one layer) in a gloo world of N processes per TP size, allocates
the decode cache from this rank's real modules (models/inference.py) and reports rank 0's elements and
bytes next to the formula. `--verify` decodes a random sequence token by token with the cache and
compares the logits with one full forward; it exits 1 when the largest difference exceeds --tol.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pretrain import cpu_compat  # noqa: E402,F401  (silences megatron's import warnings)

TYPES = ("mha", "gqa", "mqa", "gta", "gla", "mla")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VOCAB = 256


def formula(cfg, tp: int) -> int:
    """The methods' per-device cache elements per token per layer (docs/results/attention.md)."""
    a, d, h = cfg.attention, cfg.model.kv_channels, cfg.model.heads
    d_r = (a.rope_dim if a.type == "gta" else a.qk_pos_emb_head_dim) or d // 2
    if a.type in ("mha", "gqa", "mqa"):
        kv = cfg.num_query_groups()
        return 2 * max(kv // tp, 1) * d
    if a.type == "gta":
        return (cfg.num_query_groups() // tp) * d + d_r
    if a.type == "gla":
        return max(a.num_latent_heads // tp, 1) * (a.latent_dim or 2 * d) + d_r
    return (a.kv_lora_rank or 4 * d) + d_r  # mla: one latent, copied to every rank


def _configs(overrides: list[str], tp: int, types) -> dict:
    from models.inference import compose_config

    out = {}
    for t in types:
        try:
            out[t] = compose_config([*overrides, f"attention={t}", f"parallel.tensor={tp}", "model.num_layers=1"])
        except ValueError as e:
            out[t] = str(e)
    return out


def _worker(rank: int, tp: int, init_file: str, overrides: list[str], types, dtype: str, out_file: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(tp), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    import torch.distributed as dist

    from models.inference import build_for_decode, new_cache
    from pretrain import distributed
    from pretrain.config import ParallelConfig

    distributed.init(ParallelConfig(tensor=tp, backend="gloo"), init_method=f"file://{init_file}")
    try:
        rows = {}
        for t, cfg in _configs(overrides, tp, types).items():
            if isinstance(cfg, str):
                rows[t] = {"error": cfg}
                continue
            try:
                cache = new_cache(build_for_decode(cfg, VOCAB), batch=1, max_len=1, dtype=DTYPES[dtype])
                rows[t] = {"elements": cache.elements_per_token(), "bytes": cache.bytes_per_token(),
                           "formula": formula(cfg, tp)}
            except ValueError as e:
                rows[t] = {"error": str(e)}
        gathered = [None] * tp
        dist.all_gather_object(gathered, rows)
        if rank == 0:
            for t in rows:  # every rank must hold the same amount
                assert all(g[t] == rows[t] for g in gathered), f"{t}: ranks differ {[g[t] for g in gathered]}"
            Path(out_file).write_text(json.dumps(rows))
    finally:
        distributed.shutdown()


def measure(overrides: list[str], tps, types=TYPES, dtype: str = "bf16") -> list[dict]:
    import torch.multiprocessing as mp

    results = []
    for tp in tps:
        with tempfile.TemporaryDirectory() as tmp:  # a file rendezvous: no port to race for
            out = Path(tmp) / "rows.json"
            mp.spawn(_worker, args=(tp, str(Path(tmp) / "store"), overrides, list(types), dtype, str(out)),
                     nprocs=tp, join=True)
            rows = json.loads(out.read_text())
        results += [{"attention": t, "tp": tp, "dtype": dtype, **rows[t]} for t in types]
    return results


def verify(attention: str, overrides: list[str], length: int, tol: float, init_std: float) -> float:
    from models.inference import build_for_decode, compose_config, forward_cached, new_cache
    from pretrain import distributed
    from pretrain.config import ParallelConfig

    distributed.init(ParallelConfig(backend="gloo"))
    try:
        cfg = compose_config([*overrides, f"attention={attention}", f"model.init_std={init_std}"])
        gpt = build_for_decode(cfg, VOCAB)
        tokens = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(cfg.seed))
        with torch.no_grad():
            full = gpt(tokens, torch.arange(length)[None], None)
        cache = new_cache(gpt, 1, length)
        steps = [forward_cached(gpt, tokens[:, i:i + 1], cache) for i in range(length)]
        return float((torch.cat(steps, dim=1) - full).abs().max())
    finally:
        distributed.shutdown()


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
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--json", action="store_true")
    p.add_argument("--attention", choices=TYPES)
    p.add_argument("--verify", action="store_true")
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--tol", type=float, default=1e-3, help="absolute, on logits of order 10 (fp32 noise is ~1e-4)")
    p.add_argument("--init-std", type=float, default=0.1, help="--verify: larger than training's, to stress it")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. +experiment=attention_quality")
    args = p.parse_args(argv)
    if args.verify:
        if not args.attention:
            p.error("--verify needs --attention TYPE")
        diff = verify(args.attention, args.overrides, args.length, args.tol, args.init_std)
        ok = diff <= args.tol
        print(f"{args.attention}: {args.length} tokens decoded with the KV cache vs a full forward: "
              f"max |logit diff| = {diff:.3e} ({'ok' if ok else 'FAIL'}, tolerance {args.tol:g})")
        return 0 if ok else 1
    rows = measure(args.overrides, args.tp, [args.attention] if args.attention else TYPES, args.dtype)
    bad = [r for r in rows if "error" not in r and r["elements"] != r["formula"]]
    print(json.dumps(rows, indent=2) if args.json else _table(rows))
    for r in rows:
        if "error" in r and not args.json:
            print(f"  {r['attention']} at TP={r['tp']}: n/a ({r['error']})")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
