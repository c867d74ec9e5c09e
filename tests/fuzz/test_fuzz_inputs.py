"""Property-based fuzzing of everything keel reads from a user: corpus files, packed datasets and
config overrides. The invariant is the same for every case: a correct result or a one-line error
(the error types keel raises for bad input); never another exception (a traceback), a hang, or a
partial output left behind.

CI runs a short budget; `KEEL_FUZZ=deep pytest -m fuzz` runs the long one (its case counts are in
docs/reliability.md). A hang is a case that outlives HANG_SECONDS.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import string
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.fuzz
HANG_SECONDS = 60
SUFFIXES = (".bin", ".idx", ".bounds.bin", ".bounds.idx", ".json")
BUDGET = {"ci": 20, "deep": 400}[os.environ.get("KEEL_FUZZ", "ci")]  # cases per test
FUZZ = settings(max_examples=BUDGET, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@contextmanager
def no_hang():
    """Fail a case that runs past HANG_SECONDS (a hang, not a slow case)."""
    def expired(signum, frame):
        raise AssertionError(f"a case ran past {HANG_SECONDS} s: a hang")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(HANG_SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def one_line(error: Exception) -> None:
    message = str(error)
    assert message and "\n" not in message, f"not one line: {message!r}"


# ---- corpus readers -----------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)
rows = st.one_of(
    st.fixed_dictionaries({"text": st.text(max_size=200)}),  # well formed
    st.dictionaries(st.sampled_from(["text", "body", ""]), json_values, max_size=3),  # missing or wrong-typed field
    json_values)  # not even an object


def _corpus_bytes(draw, suffix: str) -> bytes:
    """A file of the given kind: valid, truncated, byte-flipped, deeply nested, huge, or random."""
    kind = draw(st.sampled_from(["valid", "truncated", "flipped", "nested", "huge", "random"]))
    if kind == "random":
        return draw(st.binary(max_size=2000))
    if kind == "nested":
        depth = draw(st.integers(100, 50_000))
        return (("[" * depth + "]" * depth) if suffix != ".txt" else "(" * depth).encode() + b"\n"
    if kind == "huge":
        return json.dumps({"text": "x" * draw(st.integers(1 << 20, 4 << 20))}).encode() + b"\n"
    values = draw(st.lists(rows, min_size=1, max_size=20))
    if suffix == ".json":
        data = json.dumps(values).encode()
    elif suffix == ".txt":
        data = "\n".join(json.dumps(v) for v in values).encode()
    else:
        data = "".join(json.dumps(v) + "\n" for v in values).encode()
    if kind == "truncated":
        data = data[: draw(st.integers(0, len(data)))]
    elif kind == "flipped" and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
    return data


@FUZZ
@given(data=st.data(), suffix=st.sampled_from([".jsonl", ".json", ".txt", ".parquet", ".arrow"]),
       skip=st.booleans())
def test_corpus_readers_give_documents_or_one_line(tmp_path, data, suffix, skip):
    from data.sources import InputError, DocumentSource

    path = tmp_path / f"corpus{suffix}"
    path.write_bytes(_corpus_bytes(data.draw, suffix))
    with no_hang():
        try:
            docs = list(DocumentSource([str(path)], skip_missing_field=skip))
        except InputError as e:
            one_line(e)
            return
    assert all(isinstance(d.text, str) for d in docs)


@FUZZ
@given(data=st.data())
def test_the_packer_packs_or_refuses_and_leaves_nothing_partial(tiny_tokenizer, tmp_path_factory, data):
    """tools/pack.py's whole path, in this process: corpus → tokenize → pack, or one line and no output."""
    from tools import pack

    folder = tmp_path_factory.mktemp("pack")
    corpus = folder / "corpus.jsonl"
    corpus.write_bytes(_corpus_bytes(data.draw, ".jsonl"))
    method = data.draw(st.sampled_from(["sp", "bfd", "concat", "pad"]))
    args = ["--no-progress", "--input", str(corpus), "--tokenizer", str(tiny_tokenizer.path), "--seq-len",
            str(data.draw(st.integers(2, 96))), "--method", method, "--output", str(folder / "out")]
    with no_hang():
        code = pack.main(args)
    written = sorted(p.name for p in folder.iterdir() if p.name.startswith("out"))
    if code == 0:
        assert written == sorted(f"out{s}" for s in SUFFIXES)
        from data.verify import verify_dataset

        assert verify_dataset(folder / "out") == []
    else:
        assert code == 2 and written == [], written  # nothing partial, not even temporary files


# ---- the packed format: its reader and --verify -----------------------------------------------------------
@FUZZ
@given(data=st.data())
def test_damaged_packed_data_is_found_or_read_correctly(packed_sp, tmp_path_factory, data):
    """Random byte flips and truncations of any file: --verify lists one-line problems, and opening
    the dataset either works (then every row reads) or fails in one line."""
    from data.format import PackedDataset
    from data.verify import verify_dataset

    folder = tmp_path_factory.mktemp("damaged")
    for s in SUFFIXES:
        shutil.copy(f"{packed_sp}{s}", folder / f"ds{s}")
    for _ in range(data.draw(st.integers(1, 3))):
        target = folder / f"ds{data.draw(st.sampled_from(SUFFIXES))}"
        raw = target.read_bytes()
        if data.draw(st.booleans()) or not raw:
            raw = raw[: data.draw(st.integers(0, len(raw)))]
        else:
            at = data.draw(st.integers(0, len(raw) - 1))
            raw = raw[:at] + bytes([raw[at] ^ data.draw(st.integers(1, 255))]) + raw[at + 1:]
        target.write_bytes(raw)
    with no_hang():
        problems = verify_dataset(folder / "ds")
        assert all("\n" not in p and str(folder) in p for p in problems)
        try:
            ds = PackedDataset(folder / "ds")
        except (ValueError, FileNotFoundError) as e:
            one_line(e)
            return
        for i in range(len(ds)):
            row = ds.row(i)
            assert len(row.tokens) == ds.seq_len


# ---- config composition -------------------------------------------------------------------------------
KEYS = ["model.hidden_size", "model.num_layers", "model.head_dim", "attention.type", "attention.num_query_groups",
        "optim.lr", "optim.spectral.tau", "trainer.global_batch_size", "trainer.micro_batch_size", "trainer.precision",
        "data.seq_len", "parallel.tensor", "logging.monitors.batch_rows", "seed", "lr.name", "model.moe.num_experts",
        "model.rope_scaling.factor", "checkpoint.keep_last"]
values = st.one_of(st.integers(-5, 5000).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
                   st.sampled_from(["gqa", "mla", "bf16", "true", "null", "[]", "{}", "[1,2", "${oops}", "'x'", ""]),
                   st.text(string.printable, max_size=12))
keys = st.one_of(st.sampled_from(KEYS), st.text(string.ascii_lowercase + "._", min_size=1, max_size=16))


@FUZZ
@given(overrides=st.lists(st.tuples(st.sampled_from(["", "+", "~"]), keys, values), max_size=4))
def test_config_composes_or_refuses_in_one_line(overrides):
    from pretrain.config import KeelConfig, compose_config

    with no_hang():
        try:
            cfg = compose_config([f"{prefix}{key}={value}" for prefix, key, value in overrides])
        except ValueError as e:
            one_line(e)
            return
    assert isinstance(cfg, KeelConfig)
