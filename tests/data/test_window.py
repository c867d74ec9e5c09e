"""Stage 1 (sliding window) of Seamless Packing: the chunking rule and its invariants."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data.window import max_join, window, window_all


def check_window(length: int, seq_len: int, ratio: float) -> None:
    starts, pool_start = window(length, seq_len, ratio)
    join = max_join(seq_len, ratio)
    assert join <= ratio * seq_len + 1e-6
    if length <= seq_len:
        assert starts.size == 0 and pool_start == 0
        return
    n = length // seq_len
    ends = starts + seq_len
    # every chunk is exactly L tokens inside the document, in order
    assert (starts >= 0).all() and (ends <= length).all() and (np.diff(starts) > 0).all()
    # every token is covered by a chunk or sent to the pool, and the pool part is a tail
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s:s + seq_len] = True
    covered[pool_start:] = True
    assert covered.all()
    assert starts[0] == 0
    overlap = (n + 1) * seq_len - length
    if length % seq_len == 0:
        assert starts.size == n and pool_start == length
    elif overlap <= n * join:  # the window: n+1 chunks, nothing truncated, last one ends at the doc end
        assert starts.size == n + 1 and pool_start == length and ends[-1] == length
        joins = ends[:-1] - starts[1:]
        assert (joins <= ratio * seq_len).all() and (joins >= 0).all()
        assert joins.max() - joins.min() <= 1  # spread evenly
        assert joins.sum() == overlap
    else:  # n chunks without overlap, the tail to the pool
        assert starts.size == n and pool_start == n * seq_len
        assert (np.diff(starts) == seq_len).all()


@pytest.mark.parametrize("seq_len", [1, 2, 3, 7, 10, 64, 2048])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.3, 0.5, 0.99])
def test_window_grid(seq_len, ratio):
    for length in list(range(0, 5 * seq_len + 3)) if seq_len < 100 else [0, 1, 2047, 2048, 2049, 3000, 3500, 4095,
                                                                         4096, 5000, 6000, 20000]:
        check_window(length, seq_len, ratio)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 600), st.integers(0, 6000), st.floats(0.0, 0.999))
def test_window_property(seq_len, length, ratio):
    check_window(length, seq_len, ratio)


def test_paper_setting_join_never_exceeds_rl():
    # L=2048, r=0.3: r*L = 614.4; the paper's budget ceil(n r L) would allow a 615-token join at n=1
    starts, pool = window(2048 + 2048 - 615, 2048, 0.3)
    assert starts.size == 1 and pool == 2048  # D = 615 > 614: no window, the tail goes to the pool
    starts, pool = window(2048 + 2048 - 614, 2048, 0.3)
    assert starts.tolist() == [0, 2048 - 614] and pool == 4096 - 614


def test_max_join_floating_point():
    assert max_join(100, 0.29) == 29 and max_join(2048, 0.3) == 614 and max_join(10, 0.0) == 0
    with pytest.raises(ValueError):
        max_join(10, 1.0)


def test_window_all_matches_single_documents():
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 5000, 500)
    L, ratio = 512, 0.3
    cdoc, cstart, pdoc, pstart, plen = window_all(lengths, L, max_join(L, ratio))
    for d, length in enumerate(lengths):
        starts, pool_start = window(int(length), L, ratio)
        assert cstart[cdoc == d].tolist() == starts.tolist()
        assert pstart[pdoc == d].tolist() == ([pool_start] if pool_start < length else [])
        assert plen[pdoc == d].sum() == length - min(pool_start, length)
    assert len(cdoc) * L + plen.sum() >= lengths.sum()  # only duplication, never loss
