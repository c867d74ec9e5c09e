"""A validation set that does not depend on how the training data was packed ("split" packing).

Every document is cut into consecutive `seq_len`-token pieces, one piece per row; the last piece of a
document is shorter and its row is padded (padding is masked out of the loss). So no row mixes
documents, every token of the sampled pieces is scored with the context of its own document only,
and two runs trained on differently packed data (concat, BFD, SP) are scored on the same rows. A
fixed random sample of the pieces keeps one evaluation cheap.

The continual-pretraining experiment (tools/experiments/cpt_experiment.py) builds its validation set
with `pack_split_val`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from data.corpus import Document
from data.format import PackedWriter
from data.packing import Plan, plan_stats
from data.pipeline import tokenized
from data.tokenizer import Tokenizer

SAMPLE_SEED = 0  # which pieces are kept: fixed, so every run and every rebuild scores the same rows


def split_pieces(offsets: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every document cut into consecutive `seq_len`-token pieces, the last one shorter.

    `offsets` are the documents' boundaries in the token stream (n + 1 of them). Returns (src, length,
    doc) per piece: its stream offset, its token count and its document. No piece mixes documents and
    every token lies in exactly one piece.
    """
    offsets = np.asarray(offsets, np.int64)
    lengths = np.diff(offsets)
    counts = -(-lengths // seq_len)  # pieces per document (ceiling division)
    doc = np.repeat(np.arange(lengths.size, dtype=np.int64), counts)
    first = np.concatenate([[0], np.cumsum(counts)])[:-1]
    k = np.arange(doc.size, dtype=np.int64) - first[doc]  # piece index within its document
    src = offsets[doc] + k * seq_len
    length = np.minimum(seq_len, offsets[doc + 1] - src)
    return src, length, doc


def sample_rows(n: int, rows: int, seed: int = SAMPLE_SEED) -> np.ndarray:
    """A fixed random subset of `rows` indices out of `n` (all of them when n <= rows), sorted."""
    if n <= rows:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=rows, replace=False))


def pack_split_val(documents: Iterable[Document], tokenizer: Tokenizer, seq_len: int, output: str | Path,
                   rows: int, source: str) -> dict:
    """Write `documents` split-packed (one document piece per row, `rows` sampled pieces) to `output`.

    `source` names the documents in the metadata (e.g. "stdlib:tests:val"). Returns the metadata. The
    files are written under temporary names and renamed at the end: a failure leaves no dataset.
    """
    with tokenized(documents, tokenizer, output, progress=False) as corpus:
        # 1. cut every document into pieces and keep a fixed sample of them, one per row
        src, length, doc = split_pieces(corpus.offsets, seq_len)
        plan = Plan.single(*(a[sample_rows(src.size, rows)] for a in (src, length, doc)))
        stats = {**corpus.stats, **plan_stats(plan, corpus.offsets, seq_len), "pieces_before_sampling": int(src.size)}
        stats.pop("tokenize_seconds", None)  # a timing: the metadata stays the same from build to build
        # 2. write the rows in plan order, each padded after its piece
        stream = corpus.stream()
        writer = PackedWriter(output, seq_len, tokenizer.vocab_size)
        try:
            buf = np.empty(seq_len, dtype=stream.dtype)
            for s, k in zip(plan.src, plan.length):
                buf[:k] = stream[s:s + k]
                buf[k:] = tokenizer.pad
                writer.add_row(buf, [0], int(k))
            settings = {"seq_len": seq_len, "sampled_rows": rows, "sample_seed": SAMPLE_SEED,
                        "description": "each document cut into seq_len pieces, tails padded; "
                                       "fixed random sample of the pieces"}
            return writer.finalize({"tokenizer": tokenizer.describe(), "method": "split", "settings": settings,
                                    "stats": stats, "source": {"inputs": [source]}})
        except BaseException:
            writer.abort()
            raise
