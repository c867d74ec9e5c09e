"""Weighted data mixing (data.sources): megatron's blend, deterministic and exactly resumable, per-source
tokens seen, and one-line errors for bad mixtures."""

from __future__ import annotations

import numpy as np
import pytest

from data.format import PackedDataset, PackedWriter
from data.loader import BLEND_BLOCK, MixedLoader, PackedLoader, WeightedDataset, build_loader

SEQ = 8


def _packed(prefix, source: int, rows: int) -> PackedDataset:
    """Rows whose every token is source * 1000 + row: a batch shows where each row came from."""
    writer = PackedWriter(prefix, SEQ, vocab_size=65_000)
    for r in range(rows):
        writer.add_row(np.full(SEQ, source * 1000 + r), [0])
    writer.finalize({"tokenizer": {"vocab_size": 65_000}})
    return PackedDataset(prefix)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[WeightedDataset]:
    root = tmp_path_factory.mktemp("mix")
    return [WeightedDataset("new", _packed(root / "new", 1, 37), 0.8),
            WeightedDataset("replay", _packed(root / "replay", 2, 11), 0.2)]


def _stream(loader: PackedLoader, steps: int) -> list[int]:
    """The first token of every row this rank saw, step by step."""
    return [int(t) for _ in range(steps) for mb in loader.next_global_batch() for t in mb["tokens"][:, 0]]


def test_rows_follow_the_weights_and_each_source_cycles_through_its_rows(sources):
    loader = MixedLoader(sources, global_batch=10, micro_batch=5, dp_rank=0, dp_size=1, seed=3)
    rows = _stream(loader, 50)  # 500 rows: several epochs of both sources
    from_new = [r for r in rows if r // 1000 == 1]
    assert len(from_new) == 400  # megatron's blend holds the share exactly
    assert np.bincount(np.array(from_new[:37]) - 1000).tolist() == [1] * 37  # an epoch is a permutation
    replay = [r - 2000 for r in rows if r // 1000 == 2]
    assert sorted(replay[:11]) == list(range(11)) and replay[:11] != replay[11:22]  # a new order each epoch
    assert loader.tokens_seen() == {"tokens_seen/new": 400 * SEQ, "tokens_seen/replay": 100 * SEQ}


def test_the_stream_is_deterministic_and_resumes_exactly(sources):
    whole = _stream(MixedLoader(sources, 10, 5, 0, 1, seed=3), 12)
    first = MixedLoader(sources, 10, 5, 0, 1, seed=3)
    head = _stream(first, 5)
    resumed = MixedLoader(sources, 10, 5, 0, 1, seed=3)
    resumed.load_state_dict(first.state_dict())
    assert head + _stream(resumed, 7) == whole
    assert all(isinstance(v, int) for v in first.state_dict().values())  # the checkpoint holds plain ints
    assert _stream(MixedLoader(sources, 10, 5, 0, 1, seed=4), 12) != whole


def test_data_parallel_ranks_split_the_same_stream(sources):
    whole = _stream(MixedLoader(sources, 10, 5, 0, 1, seed=3), 6)
    ranks = [_stream(MixedLoader(sources, 10, 5, r, 2, seed=3), 6) for r in (0, 1)]
    per_step = [ranks[0][i:i + 5] + ranks[1][i:i + 5] for i in range(0, 30, 5)]
    assert sum(per_step, []) == whole


def test_the_blend_repeats_by_block_and_counts_rows_past_it(sources):
    loader = MixedLoader(sources, 10, 5, 0, 1, seed=3)
    assert [loader._source_row(k)[0] for k in range(20)] == \
           [loader._source_row(BLEND_BLOCK * 3 + k)[0] for k in range(20)]
    loader.consumed = BLEND_BLOCK * 2 + 10
    assert loader.rows_seen().sum() == loader.consumed and abs(loader.rows_seen()[0] / loader.consumed - 0.8) < 1e-4


def test_one_source_is_the_plain_loader(sources):
    single = build_loader(sources[:1], 10, 5, 0, 1, seed=3)
    assert type(single) is PackedLoader and single.tokens_seen() == {}


@pytest.mark.parametrize("overrides, message", [
    (["data.sources=[{path: a, weight: 0.5}, {path: b, weight: 0}]", "data.val_path=v"],
     "data.sources[1].weight must be > 0, got 0.0"),
    (["data.sources=[{path: a, weight: -1}]", "data.val_path=v"], "data.sources[0].weight must be > 0"),
    (["data.sources=[{path: a}]", "data.path=p", "data.val_path=v"], "set data.path or data.sources, not both"),
    (["data.sources=[{path: a}]"], "data.sources needs data.val_path"),
    (["data.sources=[{path: x/a}, {path: y/a}]", "data.val_path=v"], "two sources named 'a'"),
])
def test_bad_mixtures_are_one_line(overrides, message):
    from pretrain.config import compose_config

    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
        compose_config(overrides)
    assert "\n" not in str(e.value)


def test_a_missing_source_names_it(tmp_path, tiny_data):
    from data.config import DataConfig, SourceConfig
    from data.prepare import ensure_tokenizer, training_sources

    cfg = DataConfig(sources=[SourceConfig(tiny_data["train"], 0.5), SourceConfig(str(tmp_path / "gone"), 0.5)],
                     val_path=tiny_data["val"], tokenizer=tiny_data["tokenizer"], seq_len=64)
    with pytest.raises(FileNotFoundError, match=r"^data.sources\[1\].path: packed dataset .*gone.* not found") as e:
        training_sources(cfg, ensure_tokenizer(cfg), None)
    assert "\n" not in str(e.value)
