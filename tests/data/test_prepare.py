"""The derived-data cache (data/prepare.py): the cached tokenizer's name, and one build per entry when
a multirun's workers start on an empty cache."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import data.pipeline
import data.prepare as prepare
from data.config import DataConfig
from data.corpus import Document
from data.format import PackedDataset
from data.prepare import tokenizer_path


def test_the_cached_tokenizer_is_named_for_the_split_it_was_trained_on(tmp_path):
    # ensure_tokenizer trains on the training side of data.val_percent's split, so each split has its own
    five, ten = DataConfig(cache_dir=str(tmp_path)), DataConfig(cache_dir=str(tmp_path), val_percent=10)
    assert tokenizer_path(five) != tokenizer_path(ten)
    assert tokenizer_path(five).parent == tokenizer_path(ten).parent == tmp_path / "tokenizers"
    assert tokenizer_path(DataConfig(tokenizer=str(tmp_path / "mine.model"))) == tmp_path / "mine.model"


def test_workers_starting_on_an_empty_cache_build_each_packed_set_once(tmp_path, tiny_tokenizer, monkeypatch):
    docs = [Document(f"m{i}.py", "def f(x):\n    return x + 1\n" * (i + 2)) for i in range(40)]
    monkeypatch.setattr(prepare, "stdlib_documents", lambda subset, split, val_percent: iter(docs))
    builds, pack = [], data.pipeline.pack_documents

    def counted(documents, tokenizer, seq_len, method, output, **kw):
        builds.append(output)
        return pack(documents, tokenizer, seq_len, method, output, **kw)

    monkeypatch.setattr(data.pipeline, "pack_documents", counted)
    cfg = DataConfig(cache_dir=str(tmp_path), seq_len=32)
    with ThreadPoolExecutor(4) as pool:  # four workers at once, each with its own lock file handle
        prefixes = list(pool.map(lambda _: prepare.ensure_packed(cfg, tiny_tokenizer), range(4)))
    assert len(set(prefixes)) == 1 and sorted(builds) == sorted(prefixes[0])  # train and val, once each
    assert all(len(PackedDataset(p)) > 0 for p in prefixes[0])
