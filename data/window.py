"""Stage 1 of Seamless Packing: a sliding window over documents longer than the sequence length.

For a document of ``l`` tokens, sequence length ``L`` and overlap ratio ``r`` (``n = l // L``):

- ``l <= L``: the whole document goes to the stage-2 pool;
- ``l % L == 0``: ``n`` chunks of exactly ``L``, no overlap;
- ``D = (n+1)L - l`` repeated tokens fit the overlap budget: ``n+1`` chunks of exactly ``L``; the
  overlap is spread evenly over the ``n`` joins (they differ by at most one token) and the last chunk
  ends at the document's end, so nothing is truncated;
- otherwise ``n`` chunks of ``L`` and the tail (``l - nL`` tokens) goes to the pool.

The paper's budget is ``D <= ceil(n r L)``; spread over ``n`` joins that can put one join at
``ceil(r L)`` tokens, one more than ``r L`` allows when ``r L`` is fractional (e.g. 615 > 614.4 at
L=2048, r=0.3). keel keeps the stronger invariant "no join overlaps more than ``r L`` tokens", i.e.
``D <= n * floor(r L)``, which is at most ``n`` tokens stricter than the paper's budget.
"""

from __future__ import annotations

import math

import numba
import numpy as np

_EPS = 1e-9  # r*L is computed in floating point: 0.29 * 100 must floor to 29, not 28


def max_join(seq_len: int, overlap_ratio: float) -> int:
    """The most tokens two consecutive chunks of one document may share: floor(r * L)."""
    if not 0.0 <= overlap_ratio < 1.0:
        raise ValueError(f"overlap ratio must be in [0, 1), got {overlap_ratio}")
    return int(math.floor(overlap_ratio * seq_len + _EPS))


@numba.njit(cache=True)
def _doc_plan(length: int, seq_len: int, join: int) -> tuple[int, int, int]:
    """(chunks, total overlap D, pool start) for one document; tokens [pool start, length) go to the pool."""
    if length <= seq_len:
        return 0, 0, 0
    n = length // seq_len
    if length == n * seq_len:
        return n, 0, length
    overlap = (n + 1) * seq_len - length
    if overlap <= n * join:
        return n + 1, overlap, length
    return n, 0, n * seq_len


@numba.njit(cache=True)
def _chunk_start(k: int, chunks: int, overlap: int, seq_len: int) -> int:
    # The first `overlap % joins` joins take one token more than the others: an even spread
    # whose joins sum to exactly `overlap`, so chunk k starts k*L minus the overlap before it.
    if overlap == 0:
        return k * seq_len
    joins = chunks - 1
    base, extra = overlap // joins, overlap % joins
    return k * seq_len - (k * base + min(k, extra))


def document_offsets(lengths: np.ndarray) -> np.ndarray:
    """Where each document starts in the stream (and, last, where the stream ends): int64, one allocation."""
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, dtype=np.int64, out=offsets[1:])
    return offsets


@numba.njit(cache=True)
def window_offsets(offsets: np.ndarray, seq_len: int, join: int):
    """Stage 1 over a whole corpus, documents ``stream[offsets[d]:offsets[d + 1]]``.

    Returns ``(chunk_src, chunk_doc, pool_src, pool_len, pool_doc)`` as stream offsets: every chunk is exactly
    ``seq_len`` tokens of document ``chunk_doc`` from ``chunk_src``; pool items are whole short documents or
    tails (each ends where its document ends), in document order.
    """
    n_docs = offsets.shape[0] - 1
    # 1. Count, so the outputs are allocated once.
    n_chunks = 0
    n_pool = 0
    for d in range(n_docs):
        length = offsets[d + 1] - offsets[d]
        c, _, p = _doc_plan(length, seq_len, join)
        n_chunks += c
        if p < length:
            n_pool += 1
    chunk_src = np.empty(n_chunks, np.int64)
    chunk_doc = np.empty(n_chunks, np.int64)
    pool_src = np.empty(n_pool, np.int64)
    pool_len = np.empty(n_pool, np.int64)
    pool_doc = np.empty(n_pool, np.int64)
    # 2. Fill.
    i = 0
    j = 0
    for d in range(n_docs):
        length = offsets[d + 1] - offsets[d]
        c, overlap, p = _doc_plan(length, seq_len, join)
        for k in range(c):
            chunk_src[i] = offsets[d] + _chunk_start(k, c, overlap, seq_len)
            chunk_doc[i] = d
            i += 1
        if p < length:
            pool_src[j] = offsets[d] + p
            pool_len[j] = length - p
            pool_doc[j] = d
            j += 1
    return chunk_src, chunk_doc, pool_src, pool_len, pool_doc


def window_all(lengths: np.ndarray, seq_len: int, join: int):
    """Stage 1 over documents of ``lengths`` tokens: ``(chunk_doc, chunk_start, pool_doc, pool_start, pool_len)``,
    starts counted from each document's beginning."""
    offsets = document_offsets(lengths)
    csrc, cdoc, psrc, plen, pdoc = window_offsets(offsets, seq_len, join)
    return cdoc, csrc - offsets[cdoc], pdoc, psrc - offsets[pdoc], plen


def window(length: int, seq_len: int, overlap_ratio: float) -> tuple[np.ndarray, int]:
    """Stage 1 for one document: (start offsets of its L-token chunks, start of the part sent to the pool).

    The pool gets tokens ``[pool_start, length)``; ``pool_start == length`` means none.
    """
    if seq_len < 1 or length < 0:
        raise ValueError(f"need seq_len >= 1 and length >= 0, got {seq_len}, {length}")
    _, starts, _, pstart, _ = window_all(np.array([length], np.int64), seq_len, max_join(seq_len, overlap_ratio))
    return starts, int(pstart[0]) if pstart.size else length
