"""tools/pack.py end to end: every method round-trips through --verify; every bad input fails cleanly."""

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest

from data.corpus import stdlib_files
from data.format import PackedWriter
from data.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, str]:
    """A tiny tokenizer and a tiny JSON-lines corpus."""
    d = tmp_path_factory.mktemp("pack")
    files = stdlib_files("code")
    model = train_tokenizer([p.read_text(errors="replace") for p in files[:15]], d / "tiny.model", 400)
    corpus = d / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": p.read_text(errors="replace")[:2500]}) + "\n" for p in files[15:40]))
    return {"tok": str(model), "corpus": str(corpus), "dir": str(d)}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/pack.py", "--no-progress", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    """tools/pack.py's main() in this process: the same code path as the CLI without the start-up cost."""
    from tools import pack

    try:
        code = pack.main(["--no-progress", *args])
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def base(tiny: dict, out: Path, *extra: str) -> list[str]:
    return ["--input", tiny["corpus"], "--tokenizer", tiny["tok"], "--seq-len", "64", "--output", str(out), *extra]


def test_compare_then_verify_each_method(tiny, tmp_path, capsys):
    r = cli(*base(tiny, tmp_path / "c", "--compare"))
    assert r.returncode == 0, r.stderr
    for word in ("sp", "bfd", "concat", "pad", "truncated tokens", "padding tokens"):
        assert word in r.stdout
    methods = ("sp", "bfd", "concat", "pad")
    code, out, err = run_main(["--verify", *(f"{tmp_path}/c.{m}" for m in methods)], capsys)  # in process: the
    assert code == 0 and out.count(": OK") == 4, err  # CLI's start-up is paid once above
    for m in methods:
        assert json.loads(Path(f"{tmp_path}/c.{m}.json").read_text())["source"]["files"] == 1


def test_single_method_and_verify_failure(tiny, tmp_path, capsys):
    code, _, err = run_main(base(tiny, tmp_path / "s", "--method", "sp", "--underfull", "pad", "--workers", "2"),
                            capsys)
    assert code == 0, err
    meta_path = tmp_path / "s.json"
    meta = json.loads(meta_path.read_text())
    assert meta["settings"]["underfull"] == "pad" and meta["method"] == "sp"
    meta["stats"]["padding_tokens"] += 1
    meta_path.write_text(json.dumps(meta))
    code, _, err = run_main(["--verify", str(tmp_path / "s")], capsys)
    assert code == 1 and "padding_tokens" in err


def bad_inputs(tiny: dict, tmp: Path) -> list[tuple[list[str], str]]:
    d = Path(tiny["dir"])
    (tmp / "empty.txt").write_text("")
    (tmp / "latin1.txt").write_bytes(b"caf\xe9 au lait\n")
    (tmp / "nofield.jsonl").write_text('{"body": "x"}\n')
    (tmp / "corrupt.model").write_bytes(b"\x00garbage")
    (tmp / "exists.json").write_text("{}")
    ok = base(tiny, tmp / "out")
    swap = lambda flag, value: [value if ok[i - 1] == flag else a for i, a in enumerate(ok)]  # noqa: E731
    return [
        (swap("--input", str(tmp / "missing.jsonl")), "matches no file"),
        (swap("--input", str(tmp / "nothing*.jsonl")), "matches no file"),
        (swap("--input", str(tmp / "empty.txt")), "all empty"),
        (swap("--input", str(tmp / "latin1.txt")), "not valid UTF-8"),
        (swap("--input", str(tmp / "nofield.jsonl")), "--text-field"),
        (swap("--tokenizer", str(d / "nope.model")), "not found"),
        (swap("--tokenizer", str(tmp / "corrupt.model")), "not a valid sentencepiece model"),
        (swap("--seq-len", "1"), "at least 2"),
        (swap("--seq-len", "abc"), "invalid int value"),
        (ok + ["--overlap-ratio", "1.0"], "[0, 1)"),
        (ok + ["--overlap-ratio", "-0.2"], "[0, 1)"),
        (ok + ["--extra-capacity", "-1"], ">= 0"),
        (swap("--output", str(tmp / "exists")), "--overwrite"),
        (ok[:-2], "missing --output"),
        (["--input", "stdlib:nonsense"] + ok[2:], "subset"),
    ]


def test_bad_inputs_fail_with_one_clear_line(tiny, tmp_path, capsys):
    cases = bad_inputs(tiny, tmp_path)
    for args, expected in cases:
        code, _, err = run_main(args, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and expected in lines[0], (args, err)
        assert not list(tmp_path.glob("out.*"))
    for args, expected in [cases[0], cases[8]]:  # and a pack.py error and an argparse one as real processes
        r = cli(*args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and expected in r.stderr, (args, r.stderr)


def test_vocabulary_too_large_for_dtype(tiny, tmp_path, monkeypatch, capsys):
    from data import tokenizer as tokmod
    from tools import pack

    real = tokmod.SentencePieceTokenizer.__init__

    def huge(self, path):
        real(self, path)
        self.vocab_size = 2**31

    monkeypatch.setattr(tokmod.SentencePieceTokenizer, "__init__", huge)
    assert pack.main(base(tiny, tmp_path / "v") + ["--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit int32" in err[0]


def test_disk_full_mid_write(tiny, tmp_path, monkeypatch, capsys):
    from tools import pack

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", f"{self.prefix}.bin.tmp")

    monkeypatch.setattr(PackedWriter, "add_row", full)
    assert pack.main(base(tiny, tmp_path / "full") + ["--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disk full" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_rows_without_the_text_field_stop_at_their_line_or_are_counted(tiny, tmp_path, capsys):
    mixed = tmp_path / "mixed.jsonl"
    good = json.loads(Path(tiny["corpus"]).read_text().splitlines()[0])
    mixed.write_text(json.dumps(good) + "\n\n" + json.dumps({"body": "no text here"}) + "\n" + json.dumps(good) + "\n")
    code, _, err = run_main(base(tiny, tmp_path / "m", "--method", "concat") + ["--input", str(mixed)], capsys)
    assert code == 2 and f"{mixed}:3 has no field 'text' (fields: body)" in err and "--skip-missing-field" in err
    code, out, err = run_main(base(tiny, tmp_path / "m", "--method", "concat", "--skip-missing-field")
                              + ["--input", str(mixed)], capsys)
    assert code == 0 and f"skipped 1 rows without the field 'text' (--skip-missing-field; first: {mixed}:3)" in out
    assert json.loads((tmp_path / "m.json").read_text())["source"]["rows_missing_text_field"] == 1


def test_input_errors_name_the_real_line_and_byte(tiny, tmp_path, capsys):
    broken = tmp_path / "broken.jsonl"
    broken.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(3000)) + '{"text": "cut\n')
    code, _, err = run_main(base(tiny, tmp_path / "b", "--method", "concat") + ["--input", str(broken)], capsys)
    assert code == 2 and f"{broken}:3001 is not valid JSON" in err
    latin = tmp_path / "late.txt"
    latin.write_bytes(b"x" * 3_000_000 + b"caf\xe9\n")  # past the first chunk any reader uses
    code, _, err = run_main(base(tiny, tmp_path / "l", "--method", "concat") + ["--input", str(latin)], capsys)
    assert code == 2 and "at byte 3000003" in err
