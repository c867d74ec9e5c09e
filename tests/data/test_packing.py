"""Bin packing (FFD, BFD) against brute force, and the packing plans of the four methods."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data.packing import (METHODS, Plan, best_fit_decreasing, build_plan, first_fit_decreasing, plan_stats,
                          rechunk)


def brute_force(lengths, capacity: int, best: bool) -> list[int]:
    """Textbook FFD / BFD: scan every open bin."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties by position
    room, bins = [], [0] * len(lengths)
    for i in order:
        fits = [b for b in range(len(room)) if room[b] >= lengths[i]]
        if not fits:
            room.append(capacity)
            fits = [len(room) - 1]
        b = min(fits, key=lambda b: (room[b], b)) if best else fits[0]
        room[b] -= lengths[i]
        bins[i] = b
    return bins


@pytest.mark.parametrize("best", [False, True])
def test_matches_brute_force_random(best):
    algo = best_fit_decreasing if best else first_fit_decreasing
    rng = np.random.default_rng(1 + best)
    for _ in range(3000):
        capacity = int(rng.integers(1, 40))
        lengths = rng.integers(0, capacity + 1, int(rng.integers(0, 60)))
        assert algo(lengths, capacity).tolist() == brute_force(lengths.tolist(), capacity, best)


@pytest.mark.parametrize("best", [False, True])
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_matches_brute_force_hypothesis(best, data):
    capacity = data.draw(st.integers(1, 300))
    lengths = data.draw(st.lists(st.integers(0, capacity), max_size=120))
    algo = best_fit_decreasing if best else first_fit_decreasing
    assert algo(np.array(lengths, np.int64), capacity).tolist() == brute_force(lengths, capacity, best)


@pytest.mark.parametrize("algo", [first_fit_decreasing, best_fit_decreasing])
def test_large_input_is_valid(algo):
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(5, 1.2, 200_000).astype(np.int64) + 1, 2048)
    bins = algo(lengths, 2048)
    load = np.bincount(bins, weights=lengths)
    assert load.max() <= 2048 and bins.max() + 1 == load.size
    placed = bins[np.argsort(-lengths, kind="stable")]
    assert (np.diff(np.unique(placed, return_index=True)[1]) > 0).all()  # numbered in the order opened
    assert load.size <= 11 / 9 * np.ceil(lengths.sum() / 2048) + 1  # FFD/BFD's worst-case ratio


@pytest.mark.parametrize("algo", [first_fit_decreasing, best_fit_decreasing])
def test_errors_and_edges(algo):
    with pytest.raises(ValueError, match="longer than the bin capacity"):
        algo(np.array([3, 11]), 10)
    with pytest.raises(ValueError, match="negative"):
        algo(np.array([-1]), 10)
    with pytest.raises(ValueError, match="capacity must be"):
        algo(np.array([1]), 0)
    assert algo(np.array([], np.int64), 5).size == 0
    assert algo(np.array([0, 0]), 5).tolist() == [0, 0]


def test_best_fit_differs_from_first_fit():
    lengths = np.array([8, 6, 3, 1])  # rooms 2 and 1 when 1 comes: FFD takes bin 0, BFD the tighter bin 1
    assert first_fit_decreasing(lengths, 10).tolist() == [0, 1, 1, 0]
    assert best_fit_decreasing(lengths, 10).tolist() == [0, 1, 1, 1]


# --- plans -------------------------------------------------------------------------------------
def random_offsets(seed: int, n: int = 300, high: int = 3000) -> np.ndarray:
    lengths = np.random.default_rng(seed).integers(1, high, n)
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def check_plan(plan: Plan, offsets: np.ndarray, seq_len: int) -> dict:
    content = plan.row_content()
    assert (content >= 1).all() and (content <= seq_len).all() and (plan.length > 0).all()
    # every piece lies inside its own document
    assert (plan.src >= offsets[plan.doc]).all() and (plan.src + plan.length <= offsets[plan.doc + 1]).all()
    stats = plan_stats(plan, offsets, seq_len)
    corpus = int(offsets[-1])
    assert stats["content_tokens"] == corpus + stats["duplicated_tokens"] - stats["truncated_tokens"]
    assert stats["output_tokens"] == stats["content_tokens"] + stats["padding_tokens"]
    return stats


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seq_len", [64, 512, 1024])
def test_plans_account_for_every_token(method, seq_len):
    offsets = random_offsets(seq_len)
    stats = check_plan(build_plan(method, offsets, seq_len), offsets, seq_len)
    if method in ("concat", "bfd"):
        assert stats["truncated_tokens"] == 0 and stats["duplicated_tokens"] == 0
    if method == "concat":
        assert stats["padding_tokens"] == stats["rows"] * seq_len - offsets[-1] < seq_len
    if method == "pad":
        assert stats["rows"] == offsets.size - 1 and stats["split_documents"] == 0


@pytest.mark.parametrize("underfull", ["concat", "pad"])
def test_sp_plan(underfull):
    offsets, L = random_offsets(7, 500), 512
    plan = build_plan("sp", offsets, L, 0.3, 50, underfull)
    stats = check_plan(plan, offsets, L)
    lengths = np.diff(offsets)
    assert stats["truncated_tokens"] <= 50 * stats["rows"]
    assert stats["overlapped_documents"] > 0 and stats["duplicated_tokens"] > 0
    if underfull == "concat":  # only the very last row may be padded
        assert stats["padding_tokens"] < L
    # with no extra capacity and pad, SP never truncates
    zero = plan_stats(build_plan("sp", offsets, L, 0.3, 0, "pad"), offsets, L)
    assert zero["truncated_tokens"] == 0
    if underfull == "pad":  # then only stage 1 splits documents, and only those longer than L
        assert stats["split_documents"] <= int((lengths > L).sum())


def test_sp_truncates_only_bin_tails():
    # three pool items of 60 tokens and L=100, c=50: FFD puts two per 150-capacity bin -> 120 cut to 100
    offsets = np.array([0, 60, 120, 180], np.int64)
    plan = build_plan("sp", offsets, 100, 0.3, 50, "pad")
    stats = plan_stats(plan, offsets, 100)
    assert stats["truncated_tokens"] == 20 and stats["rows"] == 2
    assert plan.length.tolist() == [60, 40, 60]


def test_rechunk():
    plan = rechunk(np.array([0, 100, 200]), np.array([5, 0, 7]), np.array([0, 1, 2]), 4)
    assert plan.rows == 3 and plan.row_content().tolist() == [4, 4, 4]
    assert plan.src.tolist() == [0, 4, 200, 203] and plan.length.tolist() == [4, 1, 3, 4]


def test_stats_of_pieces_out_of_start_order():
    """A document's pieces in plan order but not start order: counted as if sorted (no single pass applies)."""
    offsets = np.array([0, 10, 30], np.int64)
    ordered = Plan(np.array([0, 10, 18]), np.array([6, 10, 10]), np.array([0, 1, 1]), np.array([0, 1, 2, 3]))
    swapped = Plan(np.array([18, 0, 10]), np.array([10, 6, 10]), np.array([1, 0, 1]), np.array([0, 1, 2, 3]))
    stats = plan_stats(swapped, offsets, 10)
    assert stats == plan_stats(ordered, offsets, 10)
    assert stats["truncated_tokens"] == 6 and stats["duplicated_tokens"] == 2 and stats["overlapped_documents"] == 1


def test_rechunk_cuts_the_stream_every_l_tokens():
    """Against the stream itself, token by token: every row is the next L tokens, every piece one document's run."""
    rng = np.random.default_rng(5)
    for _ in range(50):
        n, seq_len = int(rng.integers(0, 12)), int(rng.integers(1, 9))
        length = rng.integers(0, 20, n) * (rng.random(n) < 0.8)
        src, doc = rng.integers(0, 1000, n) * 100, rng.permutation(n)
        tokens = [(s + t, d) for s, k, d in zip(src, length, doc) for t in range(k)]
        plan = rechunk(src, length, doc, seq_len)
        assert plan.rows == -(-len(tokens) // seq_len)
        for r in range(plan.rows):
            pieces = range(plan.row_ptr[r], plan.row_ptr[r + 1])
            got = [(plan.src[p] + t, plan.doc[p]) for p in pieces for t in range(plan.length[p])]
            assert got == tokens[r * seq_len:(r + 1) * seq_len]
            docs = [plan.doc[p] for p in pieces]  # cut only where a row or a piece starts: no two runs of one piece
            assert all(plan.length[p] > 0 for p in pieces) and all(a != b for a, b in zip(docs, docs[1:]))
