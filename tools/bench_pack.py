"""Benchmarks of the offline packer.

1. Bin packing: the Numba FFD/BFD on 1M and 10M lognormal lengths, and against a straightforward
   Python FFD that scans the open bins (the reference implementation's algorithm) on sizes it can
   finish, comparing both on the same sizes.
2. End to end: tools/pack.py's pipeline on the default corpus (stdlib) against sentencepiece
   tokenization alone, i.e. the packer's overhead over the work it cannot avoid ("vs encode": total
   over encode-alone, both best of 2; "(plan+write)/tokenize": the packing phases over the
   tokenization phase of the same run, which a busy shared machine disturbs less).

3. Staged packing (data/staged.py): the stdlib corpus as JSON-lines files, packed through the three
   stages under the local executor with 1 and 2 jobs; tokens/s per stage (wall time of the stage), and
   from the rates of one job the wall time of a 1T-token corpus on N nodes of C cores.
4. The plan stage end to end (sliding windows, bins, statistics, row order), per method, on synthetic
   document lengths, each in a fresh process so that its peak memory (max RSS) is its own.

    python tools/bench_pack.py [--sizes 1000000 10000000] [--python-sizes 10000 20000 50000]
    python tools/bench_pack.py --only staged plan --plan-sizes 10000000 100000000 --nodes 1 8 64 --cores 64
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from data.packing import best_fit_decreasing, first_fit_decreasing

SEQ_LEN, EXTRA = 2048, 50  # SP's bins at the paper's setting
DEFAULT_TOKENIZER = "/tmp/keel-pack/stdlib-8192.model"


def lognormal_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Pool-like item lengths: median ~400 tokens, heavy tail, capped at L (longer ones are windowed)."""
    return np.clip(np.random.default_rng(seed).lognormal(6.0, 1.0, n).astype(np.int64), 1, SEQ_LEN)


def python_ffd(lengths: list[int], capacity: int) -> list[int]:
    """First-fit-decreasing by scanning every open bin, O(N x B)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    room: list[int] = []
    bins = [0] * len(lengths)
    for i in order:
        x = lengths[i]
        for b, r in enumerate(room):
            if r >= x:
                break
        else:
            b = len(room)
            room.append(capacity)
        room[b] -= x
        bins[i] = b
    return bins


def timed(fn, *args, repeat: int = 1, **kwargs) -> tuple[float, object]:
    """Best wall time of `repeat` runs (the machine is shared: the minimum is the least disturbed)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn(*args, **kwargs)
        if time.perf_counter() - t < best:
            best, out = time.perf_counter() - t, result
    return best, out


def bench_binpacking(sizes: list[int], python_sizes: list[int]) -> None:
    cap = SEQ_LEN + EXTRA
    first_fit_decreasing(lognormal_lengths(100), cap)  # compile (or load the cache) outside the timings
    best_fit_decreasing(lognormal_lengths(100), cap)
    print(f"## bin packing, capacity {cap}, lognormal(6, 1) lengths capped at {SEQ_LEN}")
    print(f"{'items':>11} {'bins':>10} {'numba FFD s':>12} {'numba BFD s':>12} {'python FFD s':>13} {'speed-up':>9}")
    for n in sorted(set(python_sizes) | set(sizes)):
        lengths = lognormal_lengths(n)
        t_ffd, bins = timed(first_fit_decreasing, lengths, cap)
        t_bfd, _ = timed(best_fit_decreasing, lengths, cap)
        py = ""
        if n in python_sizes:
            t_py, ref = timed(python_ffd, lengths.tolist(), cap)
            assert ref == bins.tolist(), "Numba FFD disagrees with the Python FFD"
            py = f"{t_py:13.3f} {t_py / t_ffd:8.0f}x"
        print(f"{n:11,} {int(bins.max()) + 1:10,} {t_ffd:12.3f} {t_bfd:12.3f} {py}")


def stdlib_tokenizer(path: str):
    """The tokenizer at `path`, trained on stdlib (vocab 8192) first if it is missing."""
    from data.corpus import stdlib_documents
    from data.tokenizer import load_tokenizer, train_tokenizer

    if not Path(path).exists():
        train_tokenizer((d.text for d in stdlib_documents("all", "train")), path, 8192)
    return load_tokenizer(path)


def bench_end_to_end(tokenizer_path: str, workers: list[int]) -> None:
    import megatron.core.datasets.indexed_dataset  # noqa: F401  (its import is start-up, not packing)

    from data.corpus import stdlib_documents
    from data.pipeline import pack_documents

    tok = stdlib_tokenizer(tokenizer_path)
    docs = list(stdlib_documents())  # read once, so both sides time tokenization and packing only
    t_sp, _ = timed(lambda: [tok.encode_batch([d.text for d in docs[i:i + 256]]) for i in range(0, len(docs), 256)],
                    repeat=2)
    print(f"\n## end to end on stdlib ({len(docs):,} files), L={SEQ_LEN}, tokenizer vocab {tok.vocab_size}")
    print(f"sentencepiece encode alone (1 process, best of 2): {t_sp:.2f} s")
    print(f"{'method':>7} {'workers':>7} {'total s':>8} {'tokenize':>9} {'plan':>7} {'write':>7} "
          f"{'tokens/s':>10} {'vs encode':>9} {'(plan+write)/tokenize':>22}")
    with tempfile.TemporaryDirectory() as d:
        for w in workers:
            for method in ("sp", "concat"):
                t, meta = timed(pack_documents, docs, tok, SEQ_LEN, method, f"{d}/{method}{w}", repeat=2,
                                workers=w, overwrite=True, progress=False)
                s = meta["stats"]["seconds"]
                print(f"{method:>7} {w:>7} {t:8.2f} {s['tokenize']:9.2f} {s['plan']:7.3f} {s['write']:7.2f} "
                      f"{meta['stats']['corpus_tokens'] / t:10,.0f} {t / t_sp:8.2f}x "
                      f"{(s['plan'] + s['write']) / s['tokenize']:21.2%}")


def synthetic_document_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Documents, not pool items: lognormal(6, 1) tokens uncapped (mean ~665; ~5% longer than L are windowed)."""
    return np.maximum(np.random.default_rng(seed).lognormal(6.0, 1.0, n).astype(np.int64), 1)


def plan_one(method: str, n: int) -> dict:
    """The plan stage of data/staged.py on n synthetic lengths, in this process: CPU seconds (one thread: on an idle
    machine the wall time; on this shared one far less disturbed by the neighbours) and peak memory."""
    from data.packing import build_plan, plan_stats
    from data.pipeline import row_order
    from data.window import document_offsets

    warm = np.concatenate([[0], np.cumsum(synthetic_document_lengths(1000))])
    plan_stats(build_plan(method, warm, SEQ_LEN), warm, SEQ_LEN)  # compile (or load the cache) outside the timings
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # the interpreter and its modules
    lengths = synthetic_document_lengths(n)
    t0 = time.process_time()
    offsets = document_offsets(lengths)
    plan = build_plan(method, offsets, SEQ_LEN)
    t1 = time.process_time()
    plan_stats(plan, offsets, SEQ_LEN)
    t2 = time.process_time()
    row_order(plan.rows, 0)
    t3 = time.process_time()
    return {"method": method, "lengths": n, "rows": plan.rows, "plan_s": t1 - t0, "stats_s": t2 - t1,
            "order_s": t3 - t2, "total_s": t3 - t0, "mean_length": float(lengths.mean()),
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9 - before}


def bench_plan_stage(sizes: list[int], methods: list[str]) -> dict[str, dict]:
    print(f"\n## plan stage end to end, L={SEQ_LEN}, synthetic lognormal(6, 1) document lengths (one process "
          "each; CPU seconds; peak GB: max RSS above the process's before the lengths)")
    print(f"{'method':>7} {'lengths':>12} {'windows+bins s':>15} {'stats s':>8} {'order s':>8} {'total s':>8} "
          f"{'s per 10M':>10} {'peak GB':>8} {'1B: est. s':>11} {'1B: est. GB':>12}")
    largest = {}
    for n in sizes:
        for m in methods:
            out = subprocess.run([sys.executable, __file__, "--plan-one", m, str(n)], capture_output=True, text=True,
                                 check=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            scale = 1e9 / n
            print(f"{m:>7} {n:12,} {r['plan_s']:15.2f} {r['stats_s']:8.2f} {r['order_s']:8.2f} {r['total_s']:8.2f} "
                  f"{r['total_s'] * 1e7 / n:10.2f} {r['peak_gb']:8.2f} {r['total_s'] * scale:11.0f} "
                  f"{r['peak_gb'] * scale:12.0f}")
            largest[m] = r
    return largest


def _staged_corpus(folder: Path, files: int) -> list[str]:
    """The stdlib corpus as `files` JSON-lines files, documents in the order the stdlib corpus reads them."""
    from data.corpus import stdlib_documents

    docs = [d.text for d in stdlib_documents()]
    paths = []
    for k in range(files):
        path = folder / f"stdlib-{k:03d}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[k::files]))
        paths.append(str(path))
    return paths


def bench_staged(tokenizer_path: str, jobs: list[int], files: int) -> dict[int, dict]:
    import megatron.core.datasets.indexed_dataset  # noqa: F401  (its import is start-up, not packing)

    from data.executors import LocalExecutor
    from data.sources import DocumentSource
    from data.staged import pack_staged

    tok = stdlib_tokenizer(tokenizer_path)
    rates = {}
    with tempfile.TemporaryDirectory() as d:
        inputs = _staged_corpus(Path(d), files)
        print(f"\n## staged pack (sp, L={SEQ_LEN}) of stdlib as {files} JSON-lines files, local executor")
        print(f"{'jobs':>5} {'tokenize s':>11} {'tokens/s':>11} {'plan s':>7} {'write+merge s':>14} {'tokens/s':>11} "
              f"{'total s':>8} {'tokenize tok/CPU-s':>18} {'write tok/CPU-s':>16}")
        for j in jobs:
            executor, seconds = LocalExecutor(j), {}
            try:
                for stage in ("tokenize", "plan", "write"):
                    t = time.perf_counter()
                    record = pack_staged(DocumentSource(inputs), tok, SEQ_LEN, "sp", f"{d}/out{j}", f"{d}/work{j}",
                                         executor, stages=(stage,), parts=files, progress=False)
                    seconds[stage] = time.perf_counter() - t
            finally:
                executor.close()
            tokens = record["meta"]["stats"]["corpus_tokens"]
            cpu = {stage: sum(json.loads(p.read_text())["cpu_seconds"] for p in Path(f"{d}/work{j}").glob(pattern))
                   for stage, pattern in (("tokenize", "shards/*.json"), ("write", "parts/*/*.json"))}
            rates[j] = {"tokens": tokens, "tokenize": tokens / seconds["tokenize"], "plan_s": seconds["plan"],
                        "write": tokens / seconds["write"], "tokenize_per_cpu_s": tokens / cpu["tokenize"],
                        "write_per_cpu_s": tokens / cpu["write"]}
            print(f"{j:5} {seconds['tokenize']:11.2f} {rates[j]['tokenize']:11,.0f} {seconds['plan']:7.2f} "
                  f"{seconds['write']:14.2f} {rates[j]['write']:11,.0f} {sum(seconds.values()):8.2f} "
                  f"{rates[j]['tokenize_per_cpu_s']:18,.0f} {rates[j]['write_per_cpu_s']:16,.0f}")
    return rates


def cluster_estimate(rates: dict[int, dict], plan: dict[str, dict], nodes: list[int], cores: int,
                     corpus_tokens: float = 1e12) -> None:
    """Wall time of a corpus on N nodes of C cores: tokens per CPU-second of the tasks here (per core, and far
    less disturbed by a shared machine than wall time) times N x C, assuming the stages scale with cores (each
    task is independent); the plan from the plan stage's CPU time per length; the merge one sequential copy."""
    one = rates[min(rates)]
    sp = plan.get("sp") or next(iter(plan.values()))
    docs = corpus_tokens / sp["mean_length"]
    plan_s = sp["total_s"] * docs / sp["lengths"]
    plan_gb = sp["peak_gb"] * docs / sp["lengths"]
    merge_s = corpus_tokens * 2 / 1e9  # uint16 tokens copied once at ~1 GB/s (a parallel file system does more)
    print(f"\n## estimate: {corpus_tokens:.0e} tokens on N nodes of {cores} cores (per core: tokenize "
          f"{one['tokenize_per_cpu_s']:,.0f} tokens/s, write {one['write_per_cpu_s']:,.0f} tokens/s; plan "
          f"{docs:.2e} documents of ~{sp['mean_length']:.0f} tokens on one node: {plan_s / 60:.0f} min, "
          f"~{plan_gb:.0f} GB; merge at 1 GB/s: {merge_s / 3600:.1f} h)")
    print(f"{'nodes':>6} {'tokenize h':>11} {'plan h':>7} {'write h':>8} {'merge h':>8} {'total h':>8}")
    for n in nodes:
        tok_h = corpus_tokens / (one["tokenize_per_cpu_s"] * n * cores) / 3600
        write_h = corpus_tokens / (one["write_per_cpu_s"] * n * cores) / 3600
        total = tok_h + plan_s / 3600 + write_h + merge_s / 3600
        print(f"{n:6} {tok_h:11.2f} {plan_s / 3600:7.2f} {write_h:8.2f} {merge_s / 3600:8.2f} {total:8.2f}")


def main() -> None:
    warnings.filterwarnings("ignore", category=UserWarning)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--python-sizes", type=int, nargs="+", default=[10_000, 20_000, 50_000])
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="trained on stdlib (vocab 8192) if missing")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--only", nargs="+", choices=("binpacking", "end-to-end", "staged", "plan"),
                   default=["binpacking", "end-to-end", "staged", "plan"])
    p.add_argument("--files", type=int, default=8, help="staged: the stdlib corpus as this many files (shards)")
    p.add_argument("--plan-sizes", type=int, nargs="+", default=[10_000_000, 100_000_000])
    p.add_argument("--plan-methods", nargs="+", default=["sp", "bfd", "concat", "pad"])
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--cores", type=int, default=64, help="estimate: cores per node")
    p.add_argument("--plan-one", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.plan_one:  # a child of bench_plan_stage
        print(json.dumps(plan_one(args.plan_one[0], int(args.plan_one[1]))))
        return
    print(f"# bench_pack: {platform.machine()}, Python {platform.python_version()}, numpy {np.__version__}")
    if "binpacking" in args.only:
        bench_binpacking(args.sizes, args.python_sizes)
    if "end-to-end" in args.only:
        bench_end_to_end(args.tokenizer, args.workers)
    plan = bench_plan_stage(args.plan_sizes, args.plan_methods) if "plan" in args.only else {}
    if "staged" in args.only:
        rates = bench_staged(args.tokenizer, args.workers, args.files)
        if plan:
            cluster_estimate(rates, plan, args.nodes, args.cores)


if __name__ == "__main__":
    main()
