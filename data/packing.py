"""Bin packing in O(N log B): first-fit-decreasing and best-fit-decreasing, in Numba.

Both sort items by length, longest first, ties by input position (a stable counting sort), then
place them one at a time, exactly as the textbook algorithms do:

- first fit: the lowest-numbered open bin with room; a 16-ary tree over the bins' remaining
  capacities (max per node) finds it by descending to the leftmost leaf with enough room. Bins not
  yet opened sit in the tree at full capacity, so "no open bin fits" needs no special case.
- best fit: the bin with the least room that still fits, ties to the lowest bin number. Bins are
  bucketed by remaining capacity; a count tree over capacities finds the smallest non-empty bucket
  at or above the item's length, and each bucket is a leftist min-heap of bin numbers.

Bins are numbered in the order they are opened. The number of bins is bounded by any-fit's
``2 * sum / capacity + 1`` (at most one bin is half full or less), which sizes the structures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from data.config import PackMethod
from data.window import max_join, window_offsets

_HEAP_PATH = 130  # a leftist heap's right spine is <= log2(n + 1) nodes; merge walks two spines


def _check(lengths: np.ndarray, capacity: int) -> np.ndarray:
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be one-dimensional, got shape {lengths.shape}")
    if not 1 <= capacity < 2**31:
        raise ValueError(f"bin capacity must be in [1, 2**31), got {capacity}")
    if lengths.size and lengths.min() < 0:
        raise ValueError(f"item {int(np.argmin(lengths))} has negative length {lengths.min()}")
    if lengths.size and lengths.max() > capacity:
        i = int(np.argmax(lengths))
        raise ValueError(f"item {i} has length {lengths[i]}, longer than the bin capacity {capacity}; "
                         "split items longer than the capacity before packing")
    return lengths


def _max_bins(lengths: np.ndarray, capacity: int) -> int:
    return int(min(lengths.size, 2 * int(lengths.sum()) // capacity + 1))


@numba.njit(cache=True)
def _decreasing_order(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """(item indices, their lengths) longest first, ties by position: a stable O(N + capacity) counting sort."""
    counts = np.zeros(capacity + 2, np.int64)
    for x in lengths:
        counts[capacity - x + 1] += 1
    for k in range(1, capacity + 2):
        counts[k] += counts[k - 1]
    # The sorted lengths come from the bucket bounds, without gathering from `lengths`.
    ordered = np.empty(lengths.shape[0], np.int64)
    for k in range(capacity + 1):
        ordered[counts[k]:counts[k + 1]] = capacity - k
    order = np.empty(lengths.shape[0], np.int64)
    for i in range(lengths.shape[0]):
        k = capacity - lengths[i]
        order[counts[k]] = i
        counts[k] += 1
    return order, ordered


def _in_input_order(bins_sorted: np.ndarray, order: np.ndarray) -> np.ndarray:
    bins = np.empty_like(bins_sorted)
    bins[order] = bins_sorted
    return bins


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


_FANOUT = 16  # children per node of the first-fit tree: 16 int32 rooms are one 64-byte cache line


@numba.njit(cache=True)
def _ffd(ordered: np.ndarray, capacity: int, max_bins: int) -> np.ndarray:
    """Bins of items given longest first. Sequential over items: random access only into the tree, a 16-ary one
    so that a descent reads one cache line per level (a binary tree's lower levels miss the cache at each)."""
    # 1. Levels 0 (the root) .. depth (one leaf per bin), level l's nodes stored from base[l].
    depth = 1
    while _FANOUT ** depth < max_bins:
        depth += 1
    base = np.zeros(depth + 2, np.int64)
    for level in range(depth + 1):
        base[level + 1] = base[level] + _FANOUT ** level
    room = np.full(base[depth + 1], capacity, np.int32)  # max remaining capacity below each node
    leaves = base[depth]
    bins = np.empty(ordered.shape[0], np.int64)
    for i in range(ordered.shape[0]):
        x = ordered[i]
        # 2. Descend to the leftmost leaf (lowest bin number) with room >= x: the first child with room at each level.
        node = 0
        for level in range(1, depth + 1):
            child = base[level] + _FANOUT * node
            while room[child] < x:
                child += 1
            node = child - base[level]
        bins[i] = node
        # 3. Take the room and refresh the maxima upwards, stopping where a maximum is unchanged.
        room[leaves + node] -= x
        for level in range(depth, 0, -1):
            parent = node // _FANOUT
            first = base[level] + _FANOUT * parent
            best = room[first]
            for c in range(first + 1, first + _FANOUT):
                best = max(best, room[c])
            if room[base[level - 1] + parent] == best:
                break
            room[base[level - 1] + parent] = best
            node = parent
    return bins


def _placed_ffd(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(placement order, the items' lengths and bins in that order) under first-fit-decreasing."""
    lengths = _check(lengths, capacity)
    if lengths.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64)
    order, ordered = _decreasing_order(lengths, capacity)
    return order, ordered, _ffd(ordered, capacity, _max_bins(lengths, capacity))


def first_fit_decreasing(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Bin index of every item (in input order) under first-fit-decreasing; O(N log B)."""
    order, _, bins = _placed_ffd(lengths, capacity)
    return _in_input_order(bins, order)


@numba.njit(cache=True)
def _rank(node: int, rank: np.ndarray) -> int:
    return rank[node] if node >= 0 else 0


@numba.njit(cache=True)
def _merge(a: int, b: int, left: np.ndarray, right: np.ndarray, rank: np.ndarray, path: np.ndarray) -> int:
    """Merge two leftist min-heaps of bin numbers (-1 = empty); returns the new root."""
    if a < 0:
        return b
    if b < 0:
        return a
    if b < a:
        a, b = b, a
    root = a
    depth = 0
    # 1. Walk down the right spines, always keeping the smaller root on top.
    while True:
        path[depth] = a
        depth += 1
        r = right[a]
        if r < 0:
            right[a] = b
            break
        if b < r:
            right[a] = b
            b = r
        a = right[a]
    # 2. Restore the leftist property (rank(left) >= rank(right)) bottom-up along the path.
    for k in range(depth - 1, -1, -1):
        v = path[k]
        if _rank(left[v], rank) < _rank(right[v], rank):
            left[v], right[v] = right[v], left[v]
        rank[v] = _rank(right[v], rank) + 1
    return root


@numba.njit(cache=True)
def _count_add(count: np.ndarray, size: int, leaf: int, delta: int) -> None:
    node = leaf + size
    while node >= 1:
        count[node] += delta
        node >>= 1


@numba.njit(cache=True)
def _first_nonempty_from(count: np.ndarray, size: int, lo: int) -> int:
    """Smallest leaf >= lo with a non-zero count, or -1."""
    node = lo + size
    if count[node] > 0:
        return lo
    # 1. Climb until a right sibling subtree holds something.
    while True:
        while node > 1 and node & 1:
            node >>= 1
        if node <= 1:
            return -1
        node += 1
        if count[node] > 0:
            break
    # 2. Descend to its leftmost non-empty leaf.
    while node < size:
        node = 2 * node if count[2 * node] > 0 else 2 * node + 1
    return node - size


@numba.njit(cache=True)
def _bfd(ordered: np.ndarray, capacity: int, max_bins: int, size: int) -> np.ndarray:
    """Bins of items given longest first."""
    count = np.zeros(2 * size, np.int64)  # bins per remaining capacity, summed up the tree
    bucket = np.full(capacity + 1, -1, np.int64)  # heap root of the bins with that remaining capacity
    left = np.full(max_bins, -1, np.int64)
    right = np.full(max_bins, -1, np.int64)
    rank = np.zeros(max_bins, np.int64)
    path = np.empty(_HEAP_PATH, np.int64)
    bins = np.empty(ordered.shape[0], np.int64)
    opened = 0
    for i in range(ordered.shape[0]):
        x = ordered[i]
        # 1. The tightest bucket that fits; its lowest bin number is the heap's root.
        room = _first_nonempty_from(count, size, x)
        if room < 0:
            b = opened
            opened += 1
            room = capacity
        else:
            b = bucket[room]
            bucket[room] = _merge(left[b], right[b], left, right, rank, path)
            _count_add(count, size, room, -1)
        bins[i] = b
        # 2. Re-file the bin under its new remaining capacity.
        room -= x
        left[b] = -1
        right[b] = -1
        rank[b] = 1
        bucket[room] = _merge(bucket[room], b, left, right, rank, path)
        _count_add(count, size, room, 1)
    return bins


def _placed_bfd(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(placement order, the items' lengths and bins in that order) under best-fit-decreasing."""
    lengths = _check(lengths, capacity)
    if lengths.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64)
    order, ordered = _decreasing_order(lengths, capacity)
    return order, ordered, _bfd(ordered, capacity, _max_bins(lengths, capacity), _pow2_at_least(capacity + 1))


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Bin index of every item (in input order) under best-fit-decreasing; O(N (log B + log C))."""
    order, _, bins = _placed_bfd(lengths, capacity)
    return _in_input_order(bins, order)


# --- Packing plans: which token ranges form each row --------------------------------------------
# A plan never copies tokens: a piece is a range [src, src + length) of the tokenized corpus stream
# (documents laid end to end, each followed by its EOD), and row r is pieces row_ptr[r]:row_ptr[r+1],
# concatenated in that order. Every piece begins a (part of a) document in its row.


@dataclass
class Plan:
    src: np.ndarray  # int64 stream offset of each piece
    length: np.ndarray  # int64 tokens in each piece
    doc: np.ndarray  # int64 document of each piece
    row_ptr: np.ndarray  # int64 [rows + 1]

    @property
    def rows(self) -> int:
        return self.row_ptr.size - 1

    def row_content(self) -> np.ndarray:
        """Content tokens per row (the rest of the row is padding)."""
        sums = np.concatenate([[0], np.cumsum(self.length)])
        return sums[self.row_ptr[1:]] - sums[self.row_ptr[:-1]]

    @staticmethod
    def single(src: np.ndarray, length: np.ndarray, doc: np.ndarray) -> "Plan":
        """One piece per row."""
        return Plan(src, length, doc, np.arange(src.size + 1, dtype=np.int64))


@numba.njit(cache=True)
def _rechunk_size(src: np.ndarray, end: np.ndarray, seq_len: int) -> tuple[int, int]:
    """(pieces, rows) of ``rechunk``: a piece of k tokens from stream position pos is cut at each row start in it."""
    n, pos = 0, 0
    for i in range(src.shape[0]):
        k = end[i] - src[i]
        if k > 0:
            n += (pos + k - 1) // seq_len - pos // seq_len + 1
            pos += k
    return n, -(-pos // seq_len)


@numba.njit(cache=True)
def _rechunk_into(src, end, doc, seq_len, out_src, out_len, out_doc, row_ptr, j, row) -> None:
    """Fill ``rechunk``'s pieces [src, end) from out[j] on and its rows from row_ptr[row] on (a sort of the
    boundaries and two searchsorted took 4 s on 10M pieces); a sub-piece that starts at a multiple of seq_len
    starts its row. ``doc`` None: piece i is document i."""
    pos = 0
    for i in range(src.shape[0]):
        done = 0
        while done < end[i] - src[i]:
            take = min(end[i] - src[i] - done, seq_len - pos % seq_len)
            if pos % seq_len == 0:
                row_ptr[row + pos // seq_len] = j
            out_src[j], out_len[j], out_doc[j] = src[i] + done, take, i if doc is None else doc[i]
            j += 1
            done += take
            pos += take


@numba.njit(cache=True)
def _rechunk(src: np.ndarray, end: np.ndarray, doc, seq_len: int):
    n, rows = _rechunk_size(src, end, seq_len)
    out_src, out_len, out_doc = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64)
    row_ptr = np.empty(rows + 1, np.int64)
    row_ptr[rows] = n
    _rechunk_into(src, end, doc, seq_len, out_src, out_len, out_doc, row_ptr, 0, 0)
    return out_src, out_len, out_doc, row_ptr


def rechunk(src: np.ndarray, length: np.ndarray, doc: np.ndarray, seq_len: int) -> Plan:
    """Lay pieces end to end and cut the stream into rows of seq_len; the last row may be short."""
    src, length, doc = (np.ascontiguousarray(a, dtype=np.int64) for a in (src, length, doc))
    return Plan(*_rechunk(src, src + length, doc, seq_len))


@numba.njit(cache=True)
def _bins_to_rows(chunk_src, chunk_doc, pool_src, pool_len, pool_doc, order, ordered, bins, seq_len: int,
                  rechunk_underfull: bool):
    """The plan: one row per L-token chunk, then one row per bin, its items in placement order (longest first)
    and cut to seq_len tokens from the bin's end; with ``rechunk_underfull``, bins left under seq_len tokens
    are instead laid end to end after the others and cut every seq_len tokens.
    ``order``, ``ordered``, ``bins``: the pool's items, their lengths and their bins in placement order.
    Fused (passes over the placement order, no sort, no gather into temporaries): numpy's steps between them
    took most of the plan stage."""
    n, n_chunks = bins.shape[0], chunk_src.shape[0]
    n_bins = 0
    for i in range(n):
        n_bins = max(n_bins, bins[i] + 1)
    # 1. Per bin (one cache line): tokens placed, and the pieces that stay (non-empty, starting before seq_len).
    per_bin = np.zeros((n_bins, 2), np.int64)  # fill, kept; then fill, start
    for i in range(n):
        b = bins[i]
        if ordered[i] > 0 and per_bin[b, 0] < seq_len:
            per_bin[b, 1] += 1
        per_bin[b, 0] += ordered[i]
    # 2. Where each bin's pieces go: its row's first piece, or (rechunked) its first item among the underfull.
    rows, pieces, under = n_chunks, n_chunks, 0
    for b in range(n_bins):
        kept = per_bin[b, 1]
        if rechunk_underfull and per_bin[b, 0] < seq_len:
            per_bin[b, 1] = -1 - under  # nothing is cut from an underfull bin: all its non-empty items stay
            under += kept
        else:
            per_bin[b, 1] = pieces
            pieces += kept
            rows += 1
    # 3. The underfull bins' items in order, to cut into rows of seq_len.
    u_src, u_end, u_doc = np.empty(under, np.int64), np.empty(under, np.int64), np.empty(under, np.int64)
    if under:
        for i in range(n):
            b, k = bins[i], ordered[i]
            if per_bin[b, 1] < 0 and k > 0:
                j = -1 - per_bin[b, 1]
                per_bin[b, 1] -= 1
                u_src[j], u_doc[j] = pool_src[order[i]], pool_doc[order[i]]
                u_end[j] = u_src[j] + k
    extra_pieces, extra_rows = _rechunk_size(u_src, u_end, seq_len)
    out_src = np.empty(pieces + extra_pieces, np.int64)
    out_len = np.empty(pieces + extra_pieces, np.int64)
    out_doc = np.empty(pieces + extra_pieces, np.int64)
    row_ptr = np.empty(rows + extra_rows + 1, np.int64)
    # 4. Chunks, one per row.
    for r in range(n_chunks):
        out_src[r], out_len[r], out_doc[r], row_ptr[r] = chunk_src[r], seq_len, chunk_doc[r], r
    # 5. Bins: each item at its bin's next free piece, cut where the bin reaches seq_len.
    row = n_chunks
    for b in range(n_bins):
        if per_bin[b, 1] >= 0:
            row_ptr[row] = per_bin[b, 1]
            row += 1
        per_bin[b, 0] = 0
    for i in range(n):
        b = bins[i]
        if per_bin[b, 1] >= 0:
            k = min(max(seq_len - per_bin[b, 0], 0), ordered[i])
            per_bin[b, 0] += ordered[i]
            if k > 0:
                j = per_bin[b, 1]
                per_bin[b, 1] += 1
                out_src[j], out_len[j], out_doc[j] = pool_src[order[i]], k, pool_doc[order[i]]
    # 6. The underfull bins' items, cut every seq_len tokens.
    _rechunk_into(u_src, u_end, u_doc, seq_len, out_src, out_len, out_doc, row_ptr, pieces, rows)
    row_ptr[rows + extra_rows] = pieces + extra_pieces
    return out_src, out_len, out_doc, row_ptr


# --- The four methods ---------------------------------------------------------------------------
METHODS = tuple(PackMethod)
UNDERFULL = (PackMethod.concat, PackMethod.pad)


def _packed(offsets: np.ndarray, seq_len: int, join: int, capacity: int, placed_bins, rechunk_underfull: bool) -> Plan:
    """Full L-token chunks as rows, then the pool (short documents and tails) packed into bins of ``capacity``."""
    chunk_src, chunk_doc, pool_src, pool_len, pool_doc = window_offsets(offsets, seq_len, join)
    placed = placed_bins(pool_len, capacity)
    return Plan(*_bins_to_rows(chunk_src, chunk_doc, pool_src, pool_len, pool_doc, *placed, seq_len, rechunk_underfull))


def plan_sp(offsets: np.ndarray, seq_len: int, overlap_ratio: float, extra_capacity: int, underfull: str) -> Plan:
    """Seamless Packing: sliding window, FFD into L+c bins, cut to L, underfull bins re-chunked or padded."""
    return _packed(offsets, seq_len, max_join(seq_len, overlap_ratio), seq_len + extra_capacity, _placed_ffd,
                   underfull != "pad")


def plan_bfd(offsets: np.ndarray, seq_len: int) -> Plan:
    """Best-fit-decreasing (Ding et al. 2024): documents over L split into L-token pieces, bins padded."""
    return _packed(offsets, seq_len, 0, seq_len, _placed_bfd, False)


def plan_concat(offsets: np.ndarray, seq_len: int) -> Plan:
    """Concatenate everything and cut every L tokens (only the last row is padded)."""
    return Plan(*_rechunk(offsets[:-1], offsets[1:], None, seq_len))


@numba.njit(cache=True)
def _one_per_row(offsets: np.ndarray, seq_len: int):
    n = offsets.shape[0] - 1
    src, length, doc = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64)
    row_ptr = np.empty(n + 1, np.int64)
    for d in range(n):
        src[d], length[d], doc[d], row_ptr[d] = offsets[d], min(offsets[d + 1] - offsets[d], seq_len), d, d
    row_ptr[n] = n
    return src, length, doc, row_ptr


def plan_pad(offsets: np.ndarray, seq_len: int) -> Plan:
    """One document per row, truncated to L or padded."""
    return Plan(*_one_per_row(offsets, seq_len))


def build_plan(method: str, offsets: np.ndarray, seq_len: int, overlap_ratio: float = 0.3,
               extra_capacity: int = 50, underfull: str = "concat") -> Plan:
    """The rows of ``method`` over documents ``stream[offsets[d]:offsets[d + 1]]``."""
    offsets = np.asarray(offsets, dtype=np.int64)
    if method == "sp":
        return plan_sp(offsets, seq_len, overlap_ratio, extra_capacity, underfull)
    if method == "bfd":
        return plan_bfd(offsets, seq_len)
    if method == "concat":
        return plan_concat(offsets, seq_len)
    if method == "pad":
        return plan_pad(offsets, seq_len)
    raise ValueError(f"unknown packing method {method!r}; choose one of {', '.join(METHODS)}")


# --- What a plan costs --------------------------------------------------------------------------
@numba.njit(cache=True)
def _coverage(src: np.ndarray, length: np.ndarray, doc: np.ndarray, order: np.ndarray, offsets: np.ndarray,
              in_plan_order: bool):
    """Per corpus: (tokens covered at least once, documents split, overlapped, truncated, whether it could tell).
    Each document's pieces must come in start order. ``in_plan_order``: the pieces in plan order, one state per
    document (no sort: every method's plan keeps a document's pieces in start order), giving up (False) at a
    piece that starts before its document's previous one; otherwise the pieces in ``order``."""
    n_docs = offsets.shape[0] - 1
    state = np.zeros((n_docs, 4), np.int64)  # per document: reach + 1 (0: no piece yet), covered, flags, last start
    for i in range(src.shape[0]):
        p = i if in_plan_order else order[i]
        d, s = doc[p], src[p]
        e, reach = s + length[p], state[d, 0] - 1
        # A piece starting before the coverage so far overlaps it (sliding window); one at or after it is a cut.
        if reach < 0:
            reach = s
        elif s < state[d, 3]:
            return 0, 0, 0, 0, False
        elif s < reach:
            state[d, 2] |= 2
        else:
            state[d, 2] |= 1
        if e > reach:
            state[d, 1] += e - max(s, reach)
            reach = e
        state[d, 0], state[d, 3] = reach + 1, s
    covered, split, overlapped, truncated = 0, 0, 0, 0
    for d in range(n_docs):
        covered += state[d, 1]
        split += state[d, 2] & 1
        overlapped += state[d, 2] >> 1
        truncated += state[d, 1] < offsets[d + 1] - offsets[d]
    return covered, split, overlapped, truncated, True


def plan_stats(plan: Plan, offsets: np.ndarray, seq_len: int) -> dict:
    """Token and document accounting: content = corpus + duplicated - truncated, by construction."""
    offsets = np.asarray(offsets, np.int64)
    none = np.empty(0, np.int64)
    *counts, known = _coverage(plan.src, plan.length, plan.doc, none, offsets, True)
    if not known:  # a plan with a document's pieces out of start order: sort them (np.lexsort is stable)
        *counts, _ = _coverage(plan.src, plan.length, plan.doc, np.lexsort((plan.src, plan.doc)), offsets, False)
    covered, split, overlapped, truncated_docs = counts
    corpus = int(offsets[-1] - offsets[0])
    content = int(plan.length.sum())
    output = plan.rows * seq_len
    return {"rows": plan.rows, "output_tokens": output, "content_tokens": content,
            "padding_tokens": output - content, "truncated_tokens": corpus - int(covered),
            "duplicated_tokens": content - int(covered), "split_documents": int(split),
            "overlapped_documents": int(overlapped), "truncated_documents": int(truncated_docs),
            "pieces_per_row": round(plan.src.size / max(plan.rows, 1), 4)}
