"""The derived-data cache (data/prepare.py): the cached tokenizer's name, one build per entry when
a multirun's workers start on an empty cache, leftovers of a killed build removed; and packed data
checked against the tokenizer when a run opens it."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

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


# ---- packed data checked on open ---------------------------------------------------------------------------
def _copy_set(prefix, to) -> str:
    import shutil

    from data.format import dataset_files

    for f in dataset_files(prefix):
        shutil.copy(f, f"{to}{f.name.removeprefix(Path(prefix).name)}")
    return str(to)


def _edit_meta(prefix: str, edit) -> None:
    path = Path(f"{prefix}.json")
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def test_packed_data_is_checked_against_the_tokenizer_on_open(tiny_data, tiny_tokenizer, tmp_path):
    cfg = DataConfig(seq_len=64)
    prefix = _copy_set(tiny_data["train"], tmp_path / "train")
    recorded = json.loads(Path(f"{prefix}.json").read_text())["max_token_id"]
    assert 0 < recorded < tiny_tokenizer.vocab_size  # recorded at pack time
    # 1. a set packed before keel recorded it is scanned once, and the value recorded
    _edit_meta(prefix, lambda meta: meta.pop("max_token_id"))
    prepare.open_checked(prefix, cfg, tiny_tokenizer, "training")
    assert json.loads(Path(f"{prefix}.json").read_text())["max_token_id"] == recorded
    # 2. token ids past the vocabulary: one line before training starts
    _edit_meta(prefix, lambda meta: meta.update(max_token_id=600))
    with pytest.raises(ValueError, match=f"^training data {prefix} holds token id 600, past the 512-token vocabulary"):
        prepare.open_checked(prefix, cfg, tiny_tokenizer, "training")
    # 3. no tokenizer fingerprint: nothing shows which tokenizer packed it
    _edit_meta(prefix, lambda meta: (meta.update(max_token_id=recorded), meta["tokenizer"].pop("sha256_16")))
    with pytest.raises(ValueError, match=f"^training data {prefix}.json records no tokenizer fingerprint"):
        prepare.open_checked(prefix, cfg, tiny_tokenizer, "training")
    # 4. metadata that is not text, or not an object: named in one line
    for content in (bytes(range(256)), b"[1, 2]"):
        Path(f"{prefix}.json").write_bytes(content)
        with pytest.raises(ValueError, match=f"^{prefix}.json (is not|holds a JSON list, not) a packed dataset's") as e:
            PackedDataset(prefix)
        assert "\n" not in str(e.value)


def test_a_row_with_a_token_past_the_vocabulary_is_never_batched(tiny_data, tmp_path):
    import numpy as np

    prefix = _copy_set(tiny_data["train"], tmp_path / "train")
    tokens = np.memmap(f"{prefix}.bin", dtype=np.uint16, mode="r+")
    tokens[5 * 64 + 7] = 513  # row 5; the metadata is not told
    tokens.flush()
    ds = PackedDataset(prefix)
    ds.batch(np.array([0, 4, 6]))
    with pytest.raises(ValueError, match=f"^{prefix}.bin row 5 holds token id 513, past the 512-token vocabulary"):
        ds.batch(np.array([0, 5, 6]))


def test_leftovers_of_a_killed_build_are_removed(tmp_path, tiny_tokenizer, monkeypatch):
    from data.format import remove_leftovers

    docs = [Document(f"m{i}.py", "def f(x):\n    return x + 1\n" * (i + 2)) for i in range(40)]
    monkeypatch.setattr(prepare, "stdlib_documents", lambda subset, split, val_percent: iter(docs))
    cfg = DataConfig(cache_dir=str(tmp_path), seq_len=32)
    train, _ = prepare.packed_prefixes(cfg, tiny_tokenizer)
    Path(train).parent.mkdir(parents=True)
    dead = [Path(f"{train}.tokens.tmp999999"), Path(f"{train}.bin.tmp999999"), Path(f"{train}.bounds.idx.tmp4")]
    for f in dead:
        f.write_bytes(b"left by a kill -9")
    prepare.ensure_packed(cfg, tiny_tokenizer)
    assert not any(f.exists() for f in dead) and PackedDataset(train).meta["rows"] > 0
    # the tokenizer's trainer writes PREFIX.tmpPID.model; the cache's own files stay
    model = tmp_path / "tok.model"
    for name in ("tok.tmp999999.model", "tok.tmp999999.vocab", "tok.model", "tok.model.lock"):
        (tmp_path / name).write_text("x")
    assert sorted(p.name for p in remove_leftovers(model.with_suffix(""))) == ["tok.tmp999999.model",
                                                                               "tok.tmp999999.vocab"]
    assert model.exists() and (tmp_path / "tok.model.lock").exists()
