"""data/validation.py: documents cut into pieces, a fixed sample of them, one piece per padded row."""

import numpy as np
import pytest

from data.corpus import Document
from data.format import PackedDataset, PackedWriter
from data.validation import pack_split_val, sample_rows, split_pieces


def test_split_pieces_cover_every_token_once_without_mixing_documents():
    lengths = np.array([1, 5, 8, 9, 3])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    src, length, doc = split_pieces(offsets, 4)
    assert length.max() <= 4 and length.min() >= 1
    assert np.array_equal(np.bincount(doc, weights=length).astype(int), lengths)
    covered = np.concatenate([np.arange(s, s + k) for s, k in zip(src, length)])
    assert np.array_equal(np.sort(covered), np.arange(offsets[-1]))
    for s, k, d in zip(src, length, doc):
        assert offsets[d] <= s and s + k <= offsets[d + 1]
    assert list(np.bincount(doc)) == [1, 2, 2, 3, 1]  # ceil(length / 4) pieces per document


def test_sample_rows_is_fixed_and_sorted():
    a, b = sample_rows(100, 10), sample_rows(100, 10)
    assert np.array_equal(a, b) and np.all(np.diff(a) > 0) and a.size == 10
    assert np.array_equal(sample_rows(5, 10), np.arange(5))


def _documents() -> list[Document]:
    return [Document(f"d{i}.py", "def f(x):\n    return x + 1\n" * repeat) for i, repeat in enumerate((1, 4, 12))]


def test_pack_split_val_writes_one_padded_document_piece_per_row(tiny_tokenizer, tmp_path):
    meta = pack_split_val(_documents(), tiny_tokenizer, 16, tmp_path / "val", rows=5, source="test:docs")
    ds = PackedDataset(tmp_path / "val")
    assert len(ds) == meta["rows"] == 5 < meta["stats"]["pieces_before_sampling"]
    assert meta["method"] == "split" and meta["source"] == {"inputs": ["test:docs"]}
    rows = [ds.row(i) for i in range(len(ds))]
    for row in rows:  # one document piece from the row's start, padding after it
        assert list(row.doc_starts) == [0] and 1 <= row.content_end <= 16
        assert np.all(row.tokens[row.content_end:] == tiny_tokenizer.pad)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"val{s}" for s in
                                                               (".bin", ".idx", ".bounds.bin", ".bounds.idx", ".json"))
    # the same documents give the same rows: the sample is fixed
    pack_split_val(_documents(), tiny_tokenizer, 16, tmp_path / "again", rows=5, source="test:docs")
    assert (tmp_path / "again.bin").read_bytes() == (tmp_path / "val.bin").read_bytes()


def test_pack_split_val_leaves_nothing_behind_when_writing_fails(tiny_tokenizer, tmp_path, monkeypatch):
    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PackedWriter, "add_row", full)
    with pytest.raises(OSError, match="No space"):
        pack_split_val(_documents(), tiny_tokenizer, 16, tmp_path / "val", rows=5, source="test:docs")
    assert list(tmp_path.iterdir()) == []
