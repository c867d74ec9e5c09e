"""The offline packer's library API: tokenize a corpus to disk, plan the rows, write a packed dataset.

Memory stays bounded for corpora larger than RAM: documents stream through (parallel, ordered)
tokenization into a flat temporary file of token ids on disk; only the per-document lengths are
held in memory. The packing plan is computed from the lengths alone, then rows are assembled by
reading slices of the temporary file.

Accounting (``stats`` in the metadata): every non-empty document is followed by one EOD token, and
``corpus_tokens`` counts those EODs (``text_tokens`` does not). Then, exactly,
``content_tokens = corpus_tokens + duplicated_tokens - truncated_tokens`` and
``output_tokens = rows * seq_len = content_tokens + padding_tokens``.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections import deque
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from data.corpus import Document
from data.format import PackedWriter, dataset_exists, remove_dataset, temporary_name, token_dtype
from data.packing import METHODS, Plan, build_plan, plan_stats
from data.sources import InputError, check_settings
from data.tokenizer import Tokenizer, load_tokenizer

_CHUNK_DOCS = 256  # documents per tokenization task: big enough to amortize IPC, small for progress
_CHUNK_CHARS = 1 << 20


def check_output(output: str | Path, overwrite: bool) -> None:
    if dataset_exists(output) and not overwrite:
        raise InputError(f"output {output} already exists; pass --overwrite or choose another --output")


# --- Stage A: tokenize to a flat file on disk ---------------------------------------------------
@dataclass
class TokenizedCorpus:
    path: Path  # token ids of all non-empty documents, each followed by EOD, end to end
    offsets: np.ndarray  # int64 [documents + 1]: document d is stream[offsets[d]:offsets[d + 1]]
    dtype: type
    stats: dict

    def stream(self) -> np.ndarray:
        return np.memmap(self.path, dtype=self.dtype, mode="r")


_worker_tokenizer: Tokenizer | None = None


def _init_worker(model_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(model_path)


def _encode(texts: list[str], tokenizer: Tokenizer | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Ids of a chunk of documents, each non-empty one followed by EOD; lengths (0 = empty document)."""
    tok = tokenizer or _worker_tokenizer
    ids = tok.encode_batch(texts)
    lengths = np.array([len(x) + 1 if x else 0 for x in ids], dtype=np.int64)
    flat = np.fromiter(chain.from_iterable(x + [tok.eod] for x in ids if x), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths, sum("\ufffd" in t for t in texts)


def _chunks(documents: Iterable[Document]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for doc in documents:
        batch.append(doc.text)
        chars += len(doc.text)
        if len(batch) >= _CHUNK_DOCS or chars >= _CHUNK_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encoded(chunks: Iterator[list[str]], tokenizer: Tokenizer, pool, workers: int) -> Iterator[tuple]:
    """Encoded chunks in input order; at most 2 x workers chunks in flight, so memory stays bounded."""
    if pool is None:
        yield from (_encode(c, tokenizer) for c in chunks)
        return
    pending: deque = deque()
    for c in chunks:
        pending.append(pool.apply_async(_encode, (c,)))
        if len(pending) >= 2 * workers:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description:<9}"), BarColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), console=Console(stderr=True), disable=not enabled)


def tokenize_corpus(documents: Iterable[Document], tokenizer: Tokenizer, path: str | Path, *,
                    workers: int = 1, progress: bool = True) -> TokenizedCorpus:
    """Stream documents through the tokenizer into ``path``; the caller removes the file. The documents
    may all be empty (one shard of a corpus): `require_documents` checks a whole corpus."""
    dtype = token_dtype(tokenizer.vocab_size)
    parts, docs, tokens, replaced = [], 0, 0, 0
    start = time.perf_counter()
    with ExitStack() as stack:
        # 1. Fork the workers before rich starts its refresh thread: forking a threaded process can deadlock.
        pool = stack.enter_context(mp.get_context("fork").Pool(
            workers, initializer=_init_worker, initargs=(str(tokenizer.path),))) if workers > 1 else None
        bar = stack.enter_context(_progress(progress))
        task = bar.add_task("tokenize", total=None, info="")
        out = stack.enter_context(open(path, "wb"))
        # 2. Append each chunk's ids to the file; keep only the lengths.
        for flat, lengths, n_replaced in _encoded(_chunks(documents), tokenizer, pool, workers):
            out.write(flat.astype(dtype, copy=False).tobytes())
            parts.append(lengths)
            docs, tokens, replaced = docs + lengths.size, tokens + flat.size, replaced + n_replaced
            dt = max(time.perf_counter() - start, 1e-9)
            bar.update(task, advance=lengths.size,
                       info=f"{docs:,} docs {docs / dt:,.0f} docs/s  {tokens:,} tokens {tokens / dt:,.0f} tokens/s")
    lengths = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    nonempty = lengths[lengths > 0]
    stats = {"documents": int(nonempty.size), "empty_documents": int(lengths.size - nonempty.size),
             "corpus_tokens": int(nonempty.sum()), "text_tokens": int(nonempty.sum() - nonempty.size),
             "replacement_char_documents": int(replaced), "tokenize_seconds": time.perf_counter() - start}
    return TokenizedCorpus(Path(path), np.concatenate([[0], np.cumsum(nonempty)]).astype(np.int64), dtype, stats)


def require_documents(stats: dict) -> None:
    if stats["documents"] == 0:
        raise InputError(f"nothing to pack: the input has {stats['empty_documents']} documents, all empty; "
                         "check --input (and --text-field for structured files)")


@contextmanager
def tokenized(documents: Iterable[Document], tokenizer: Tokenizer, output: str | Path, *,
              workers: int = 1, progress: bool = True) -> Iterator[TokenizedCorpus]:
    """Tokenize next to the output (same disk), and always remove the temporary file."""
    path = Path(temporary_name(f"{output}.tokens"))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        corpus = tokenize_corpus(documents, tokenizer, path, workers=workers, progress=progress)
        require_documents(corpus.stats)
        yield corpus
    finally:
        path.unlink(missing_ok=True)


# --- Stage B: plan and write --------------------------------------------------------------------
def row_order(rows: int, seed: int) -> np.ndarray:
    """The order rows are written in: seeded and random, so neighbouring rows don't come from the same size class.
    A staged pack writes contiguous slices of this one permutation (data/staged.py)."""
    return np.random.default_rng(seed).permutation(rows)


def write_rows(plan: Plan, stream, writer: PackedWriter, pad: int, order: np.ndarray, bar) -> int:
    """Rows ``order`` of the plan, in that order; ``stream[a:b]`` gives the corpus's tokens a..b. Returns the
    content tokens written."""
    seq_len, content = writer.seq_len, 0
    buf = np.empty(seq_len, dtype=stream.dtype)
    task = bar.add_task("write", total=order.size, info=f"{order.size:,} rows")
    for n, r in enumerate(order):
        pos, starts = 0, []
        for p in range(plan.row_ptr[r], plan.row_ptr[r + 1]):
            s, k = plan.src[p], plan.length[p]
            buf[pos:pos + k] = stream[s:s + k]
            starts.append(pos)
            pos += k
        buf[pos:] = pad
        writer.add_row(buf, starts, pos)
        content += int(pos)
        if n % 1024 == 0:
            bar.update(task, completed=n)
    bar.update(task, completed=order.size)
    return content


def _shares(stats: dict) -> dict:
    def share(a: str, b: str) -> float:
        return round(stats[a] / max(stats[b], 1), 6)

    return {"truncated_share": share("truncated_tokens", "corpus_tokens"),
            "duplicated_share": share("duplicated_tokens", "corpus_tokens"),
            "padding_share": share("padding_tokens", "output_tokens"),
            "split_share": share("split_documents", "documents"),
            "documents_per_row": share("documents", "rows")}


def _timings(corpus_tokens: int, tokenize: float, plan: float, write: float) -> dict:
    total = tokenize + plan + write
    return {"seconds": {"tokenize": round(tokenize, 4), "plan": round(plan, 4), "write": round(write, 4),
                        "total": round(total, 4)},
            "tokens_per_s": round(corpus_tokens / max(total, 1e-9)),
            "packer_tokens_per_s": round(corpus_tokens / max(plan, 1e-9))}


def plan_corpus(method: str, offsets: np.ndarray, corpus_stats: dict, seq_len: int, overlap_ratio: float,
                extra_capacity: int, underfull: str) -> tuple[Plan, dict]:
    """The plan from the documents' lengths alone, and the statistics of corpus and plan (the table's)."""
    plan = build_plan(method, offsets, seq_len, overlap_ratio, extra_capacity, underfull)
    stats = {**corpus_stats, **plan_stats(plan, offsets, seq_len)}
    stats.update(_shares(stats))
    return plan, stats


def pack_settings(seq_len: int, overlap_ratio: float, extra_capacity: int, underfull: str, seed: int,
                  workers: int) -> dict:
    return {"seq_len": seq_len, "overlap_ratio": overlap_ratio, "extra_capacity": extra_capacity,
            "underfull": underfull, "seed": seed, "workers": workers,
            "row_order": "numpy default_rng(seed).permutation", "eod_after_each_document": True}


def packed_metadata(tokenizer: dict, method: str, settings: dict, stats: dict, seconds: tuple[float, float, float],
                    metadata: dict | None) -> dict:
    """A packed dataset's JSON (less what the writer adds): ``seconds`` are tokenize, plan and write."""
    stats = {**stats, **_timings(stats["corpus_tokens"], *seconds)}
    stats.pop("tokenize_seconds", None)
    return {"tokenizer": tokenizer, "method": method, "settings": settings, "stats": stats, **(metadata or {})}


def pack_tokenized(corpus: TokenizedCorpus, tokenizer: Tokenizer, seq_len: int, method: str, output: str | Path, *,
                   overlap_ratio: float = 0.3, extra_capacity: int = 50, underfull: str = "concat",
                   workers: int = 1, seed: int = 0, overwrite: bool = False, progress: bool = True,
                   metadata: dict | None = None) -> dict:
    """Plan ``method`` over a tokenized corpus and write the packed dataset; returns its metadata."""
    check_settings(seq_len, method, overlap_ratio, extra_capacity, underfull, workers)
    check_output(output, overwrite)
    settings = pack_settings(seq_len, overlap_ratio, extra_capacity, underfull, seed, workers)
    # 1. Plan from the lengths alone.
    t0 = time.perf_counter()
    plan, stats = plan_corpus(method, corpus.offsets, corpus.stats, seq_len, overlap_ratio, extra_capacity, underfull)
    t1 = time.perf_counter()
    # 2. Write under temporary names; any failure (a full disk included) leaves no complete-looking dataset.
    writer = PackedWriter(output, seq_len, tokenizer.vocab_size)
    try:
        with _progress(progress) as bar:
            write_rows(plan, corpus.stream(), writer, tokenizer.pad, row_order(plan.rows, seed), bar)
        meta = packed_metadata(tokenizer.describe(), method, settings, stats,
                               (stats["tokenize_seconds"], t1 - t0, time.perf_counter() - t1), metadata)
        if overwrite:
            remove_dataset(output)  # just before the rename, so a failed run keeps the old dataset
        return writer.finalize(meta)
    except BaseException:
        writer.abort()
        raise


def pack_documents(documents: Iterable[Document], tokenizer: Tokenizer, seq_len: int, method: str, output: str, *,
                   overlap_ratio: float = 0.3, extra_capacity: int = 50, underfull: str = "concat",
                   workers: int = 1, seed: int = 0, overwrite: bool = False, progress: bool = True,
                   metadata: dict | None = None) -> dict:
    """Tokenize ``documents`` and write them packed with ``method`` to ``output``; returns the metadata.

    Methods: ``sp`` (Seamless Packing), ``bfd`` (best-fit-decreasing), ``concat`` (concatenate and
    chunk), ``pad`` (one document per row). Output is byte-identical for the same input, settings and
    seed whatever ``workers`` is (the metadata differs only in timings and ``workers``).
    """
    check_settings(seq_len, method, overlap_ratio, extra_capacity, underfull, workers)
    check_output(output, overwrite)
    with tokenized(documents, tokenizer, output, workers=workers, progress=progress) as corpus:
        return pack_tokenized(corpus, tokenizer, seq_len, method, output, overlap_ratio=overlap_ratio,
                              extra_capacity=extra_capacity, underfull=underfull, workers=workers, seed=seed,
                              overwrite=overwrite, progress=progress, metadata=metadata)


def compare_outputs(output: str | Path, methods: Iterable[str] = METHODS) -> dict[str, str]:
    return {m: f"{output}.{m}" for m in methods}


def pack_compare(documents: Iterable[Document], tokenizer: Tokenizer, seq_len: int, output: str, *,
                 methods: Iterable[str] = METHODS, overlap_ratio: float = 0.3, extra_capacity: int = 50,
                 underfull: str = "concat", workers: int = 1, seed: int = 0, overwrite: bool = False,
                 progress: bool = True, metadata: dict | None = None) -> dict[str, dict]:
    """Tokenize once, then pack with every method to ``output.<method>``; returns each metadata."""
    outputs = compare_outputs(output, methods)
    settings = dict(overlap_ratio=overlap_ratio, extra_capacity=extra_capacity, underfull=underfull)
    for m, out in outputs.items():
        check_settings(seq_len, m, workers=workers, **settings)
        check_output(out, overwrite)
    with tokenized(documents, tokenizer, output, workers=workers, progress=progress) as corpus:
        return {m: pack_tokenized(corpus, tokenizer, seq_len, m, out, workers=workers, seed=seed, overwrite=overwrite,
                                  progress=progress, metadata=metadata, **settings) for m, out in outputs.items()}
