"""The packer's library API (data/pipeline.py) and its inputs (data/sources.py), on tiny corpora."""

import errno
import json
from pathlib import Path

import numpy as np
import pytest

from data.corpus import Document, stdlib_files
from data.format import PackedDataset, PackedWriter, dataset_files
from data.packing import METHODS, build_plan
from data.pipeline import pack_compare, pack_documents
from data.verify import verify_dataset
from data.sources import InputError, DocumentSource
from data.tokenizer import SentencePieceTokenizer as Tokenizer, train_tokenizer

L = 64


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> Tokenizer:
    texts = [p.read_text(errors="replace") for p in stdlib_files("code")[:15]]
    return Tokenizer(train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "tiny.model", 400))


@pytest.fixture(scope="session")
def documents() -> list[Document]:
    docs = [Document(str(p), p.read_text(errors="replace")[:3000]) for p in stdlib_files("code")[15:45]]
    return docs + [Document("empty", ""), Document("short", "x = 1\n")]


def stream(tok: Tokenizer, docs: list[Document]) -> np.ndarray:
    return np.concatenate([tok.encode(d.text) + [tok.eod] for d in docs if d.text])


def plan_order_rows(prefix, seed: int = 0) -> np.ndarray:
    """Rows in plan order (the writer shuffles them with default_rng(seed))."""
    ds = PackedDataset(prefix)
    perm = np.random.default_rng(seed).permutation(len(ds))
    rows = np.stack([ds.tokens[i] for i in range(len(ds))])
    out = np.empty_like(rows)
    out[perm] = rows
    return out


@pytest.mark.parametrize("method", METHODS)
def test_each_method_verifies_and_megatron_reads_it(tmp_path, tokenizer, documents, method):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    meta = pack_documents(documents, tokenizer, L, method, str(tmp_path / "d"), progress=False)
    assert verify_dataset(tmp_path / "d") == []
    s = meta["stats"]
    assert s["documents"] == len(documents) - 1 and s["empty_documents"] == 1
    assert s["corpus_tokens"] == stream(tokenizer, documents).size
    assert meta["tokenizer"] == tokenizer.describe() and meta["method"] == method
    for key in ("truncated_tokens", "padding_tokens", "duplicated_tokens", "split_documents", "seconds",
                "tokens_per_s"):
        assert key in s
    ds = IndexedDataset(str(tmp_path / "d"))
    assert len(ds) == s["rows"] and (ds.sequence_lengths == L).all()
    batch = PackedDataset(tmp_path / "d").batch(np.arange(min(4, len(ds))))
    assert batch["tokens"].shape == (min(4, len(ds)), L)


def test_concat_rows_are_the_token_stream(tmp_path, tokenizer, documents):
    pack_documents(documents, tokenizer, L, "concat", str(tmp_path / "c"), seed=3, progress=False)
    expected = stream(tokenizer, documents)
    got = plan_order_rows(tmp_path / "c", seed=3).reshape(-1)
    assert (got[:expected.size] == expected).all() and (got[expected.size:] == tokenizer.pad).all()


def test_rows_match_the_plan(tmp_path, tokenizer, documents):
    """Every row's tokens are exactly its planned slices of the corpus stream, then padding."""
    pack_documents(documents, tokenizer, L, "sp", str(tmp_path / "s"), progress=False)
    tokens = stream(tokenizer, documents)
    lengths = np.array([len(tokenizer.encode(d.text)) + 1 for d in documents if d.text])
    plan = build_plan("sp", np.concatenate([[0], np.cumsum(lengths)]), L)
    rows = plan_order_rows(tmp_path / "s")
    for r in range(plan.rows):
        pieces = range(plan.row_ptr[r], plan.row_ptr[r + 1])
        want = np.concatenate([tokens[plan.src[p]:plan.src[p] + plan.length[p]] for p in pieces])
        assert (rows[r, :want.size] == want).all() and (rows[r, want.size:] == tokenizer.pad).all()


def test_workers_do_not_change_the_output(tmp_path, tokenizer, documents):
    many = documents * 12  # several tokenization chunks, so the workers really interleave
    metas = [pack_documents(many, tokenizer, L, "sp", str(tmp_path / f"w{w}"), workers=w, progress=False)
             for w in (1, 2)]
    for a, b in zip(dataset_files(tmp_path / "w1")[:4], dataset_files(tmp_path / "w2")[:4]):
        assert a.read_bytes() == b.read_bytes(), a.name

    def strip(m: dict) -> dict:
        s = {k: v for k, v in m["stats"].items() if k not in ("seconds", "tokens_per_s", "packer_tokens_per_s")}
        return {**m, "stats": s, "settings": {k: v for k, v in m["settings"].items() if k != "workers"}}

    assert strip(metas[0]) == strip(metas[1])


def test_compare_tokenizes_once_and_writes_all(tmp_path, tokenizer, documents):
    metas = pack_compare(documents, tokenizer, L, str(tmp_path / "cmp"), progress=False)
    assert set(metas) == set(METHODS)
    for m in METHODS:
        assert verify_dataset(f"{tmp_path}/cmp.{m}") == []
    assert not list(tmp_path.glob("*.tmp*"))


def test_two_processes_writing_one_dataset_at_once_leave_a_whole_one(tmp_path, monkeypatch):
    # a multirun's workers on an empty cache build the same packed set at the same time
    import data.format

    prefix, rows = tmp_path / "shared", np.arange(20 * L).reshape(20, L) % 400
    writers = []
    for pid in (101, 102):
        monkeypatch.setattr(data.format.os, "getpid", lambda pid=pid: pid)
        writers.append(PackedWriter(prefix, L, vocab_size=400))
    for row in rows:
        for writer in writers:
            writer.add_row(row, [0])
    for writer in writers:
        writer.finalize({"tokenizer": {"vocab_size": 400}})
    ds = PackedDataset(prefix)
    assert [ds.row(i).tokens.tolist() for i in range(len(ds))] == rows.tolist()
    assert not list(tmp_path.glob("*.tmp*"))


def test_failures_leave_nothing_that_looks_complete(tmp_path, tokenizer, documents, monkeypatch):
    calls = []

    def full_disk(self, *a, **k):
        calls.append(1)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PackedWriter, "add_row", full_disk)
    with pytest.raises(OSError):
        pack_documents(documents, tokenizer, L, "sp", str(tmp_path / "f"), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_empty_corpus_and_existing_output(tmp_path, tokenizer, documents):
    with pytest.raises(InputError, match="all empty"):
        pack_documents([Document("a", ""), Document("b", "")], tokenizer, L, "sp", str(tmp_path / "e"),
                       progress=False)
    assert list(tmp_path.iterdir()) == []
    pack_documents(documents[:3], tokenizer, L, "pad", str(tmp_path / "o"), progress=False)
    with pytest.raises(InputError, match="already exists"):
        pack_documents(documents[:3], tokenizer, L, "pad", str(tmp_path / "o"), progress=False)
    meta = pack_documents(documents[:5], tokenizer, L, "pad", str(tmp_path / "o"), overwrite=True, progress=False)
    assert json.loads((tmp_path / "o.json").read_text())["rows"] == meta["rows"] == 5


@pytest.mark.parametrize("bad", [dict(seq_len=1), dict(overlap_ratio=1.0), dict(overlap_ratio=-0.1),
                                 dict(extra_capacity=-1), dict(underfull="drop"), dict(workers=0),
                                 dict(method="ffd")])
def test_bad_settings(tmp_path, tokenizer, documents, bad):
    args = {"seq_len": L, "method": "sp", **bad}
    with pytest.raises(InputError):
        pack_documents(documents, tokenizer, args.pop("seq_len"), args.pop("method"), str(tmp_path / "x"),
                       progress=False, **args)


def test_verify_catches_inconsistent_metadata(tmp_path, tokenizer, documents):
    pack_documents(documents, tokenizer, L, "bfd", str(tmp_path / "v"), progress=False)
    meta_path = tmp_path / "v.json"
    meta = json.loads(meta_path.read_text())
    meta["stats"]["truncated_tokens"] += 1
    meta_path.write_text(json.dumps(meta))
    assert any("truncated" in p for p in verify_dataset(tmp_path / "v"))


# --- sources ------------------------------------------------------------------------------------
def test_sources_read_every_format(tmp_path):
    import datasets

    rows = [{"text": "alpha", "id": 1}, {"text": "", "id": 2}, {"text": "gamma", "id": 3}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "b.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "c.parquet"))
    arrow_dir = tmp_path / "arrow"
    datasets.Dataset.from_list(rows).save_to_disk(str(arrow_dir))
    (tmp_path / "d.txt").write_text("one\n\nthree\n")
    for pattern in ["a.jsonl", "b.json", "c.parquet", "arrow/*.arrow"]:
        docs = list(DocumentSource([str(tmp_path / pattern)]))
        assert [d.text for d in docs] == ["alpha", "", "gamma"], pattern
    assert [d.text for d in DocumentSource([str(tmp_path / "d.txt")], text_mode="line")] == ["one", "", "three"]
    assert [d.text for d in DocumentSource([str(tmp_path / "d.txt")])] == ["one\n\nthree\n"]
    assert len(list(DocumentSource([str(tmp_path / "*.json*")]))) == 6


def test_sources_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(InputError, match="no field 'text'.*--text-field"):
        DocumentSource([str(tmp_path / "a.jsonl")])
    assert [d.text for d in DocumentSource([str(tmp_path / "a.jsonl")], text_field="body")] == ["x"]
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(InputError, match="not valid UTF-8"):
        list(DocumentSource([str(tmp_path / "bad.txt")]))
    with pytest.raises(InputError, match="matches no file"):
        DocumentSource([str(tmp_path / "missing*.jsonl")])
    with pytest.raises(InputError, match="subset"):
        DocumentSource(["stdlib:everything"])
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="cannot read"):
        DocumentSource([str(tmp_path / "broken.parquet")])


def test_stdlib_source_subsets():
    code = DocumentSource(["stdlib:code"])
    first = next(iter(code))
    assert first.text and "/test/" not in f"/{first.name}"
    assert code.describe()["files"] == 0
    val = next(iter(DocumentSource(["stdlib:tests:val"])))
    assert {"test", "tests"} & set(Path(val.name).parts[:-1])
    # the held-out share is the packer's --val-percent (data.val_percent): more held out, more val files
    names = {p: {d.name for d in DocumentSource(["stdlib:code:val"], val_percent=p)} for p in (5.0, 30.0)}
    assert names[5.0] < names[30.0]
    assert DocumentSource(["stdlib:code:val"], val_percent=30.0).describe()["val_percent"] == 30.0
    assert names[30.0].isdisjoint(d.name for d in DocumentSource(["stdlib:code:train"], val_percent=30.0))
    assert code.describe()["val_percent"] == 5.0  # the default, as data.val_percent's
    with pytest.raises(InputError, match=r"held-out share .* --val-percent"):
        DocumentSource(["stdlib:code:val"], val_percent=60)
