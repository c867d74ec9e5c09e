"""The staged packer (data/staged.py) under its executors (data/executors.py): the same bytes as one process,
resumable after a kill, a failed task retried by name, a damaged shard named in one line."""

import json
import os
import signal
import time
from pathlib import Path

import pytest

from data.corpus import stdlib_files
from data.executors import LocalExecutor, StageFailed, SubmititExecutor
from data.format import dataset_files
from data.packing import METHODS
from data.pipeline import pack_documents
from data.sources import DocumentSource, InputError
from data.staged import TokenizeTask, pack_staged, shard_prefix
from data.tokenizer import load_tokenizer, train_tokenizer
from data.verify import verify_dataset

L = 64
BINARIES = (".bin", ".idx", ".bounds.bin", ".bounds.idx")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict:
    """A tiny tokenizer and five JSON-lines files: one holds only an empty document (an empty shard)."""
    d = tmp_path_factory.mktemp("staged")
    files = stdlib_files("code")
    model = train_tokenizer([p.read_text(errors="replace") for p in files[:15]], d / "tiny.model", 400)
    inputs = []
    for k, texts in enumerate([files[15:23], files[23:31], [], files[31:39], files[39:45]]):
        path = d / f"part{k}.jsonl"
        rows = [{"text": p.read_text(errors="replace")[:2500]} for p in texts] + [{"text": ""}]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        inputs.append(str(path))
    return {"tok": load_tokenizer(model), "inputs": inputs}


@pytest.fixture(scope="session")
def single(corpus, tmp_path_factory) -> dict[str, Path]:
    """Each method packed by one process: the reference."""
    d = tmp_path_factory.mktemp("single")
    for m in METHODS:
        pack_documents(DocumentSource(corpus["inputs"]), corpus["tok"], L, m, str(d / m), seed=3, progress=False)
    return {m: d / m for m in METHODS}


def staged(corpus, out: Path, method: str, executor, **kw) -> dict:
    kw = {"parts": 3, **kw}
    return pack_staged(DocumentSource(corpus["inputs"]), corpus["tok"], L, method, str(out), out.parent / "work",
                       executor, seed=3, progress=False, **kw)


def assert_same_rows(a: Path, b: Path) -> None:
    for suffix in BINARIES:
        assert Path(f"{a}{suffix}").read_bytes() == Path(f"{b}{suffix}").read_bytes(), suffix


@pytest.fixture
def local():
    executor = LocalExecutor(2)
    yield executor
    executor.close()


def test_every_method_equals_one_process_byte_for_byte(corpus, single, tmp_path, local, monkeypatch, capsys):
    # shard 1 fails once (a flaky node): it is retried, and the retry is reported by its name
    from data import staged as staged_module

    flaky, real = tmp_path / "failed-once", staged_module.TokenizeTask.__call__

    def once(self):
        if self.index == 1 and not flaky.exists():
            flaky.touch()
            raise RuntimeError("node lost")
        return real(self)

    monkeypatch.setattr(staged_module.TokenizeTask, "__call__", once)  # the local executor forks: it sees this
    for m in METHODS:  # one work folder: the shards are tokenized once, then every method plans from them
        record = staged(corpus, tmp_path / m, m, local, metadata={"source": {"inputs": corpus["inputs"]}})
        assert_same_rows(tmp_path / m, single[m])
        assert verify_dataset(tmp_path / m) == []
        ours, theirs = record["meta"], json.loads(Path(f"{single[m]}.json").read_text())
        for meta in (ours, theirs):  # what may differ: timings, worker counts, the stages' own record
            meta["stats"] = {k: v for k, v in meta["stats"].items() if "_per_s" not in k and k != "seconds"}
            meta["settings"].pop("workers")
        assert {k: v for k, v in ours.items() if k not in ("staged", "source")} == \
               {k: v for k, v in theirs.items() if k != "source"}
        assert ours["staged"]["shards"] == 5 and ours["staged"]["parts"] == 3
    retried = [line for line in capsys.readouterr().err.splitlines() if "node lost" in line]
    assert retried == [f"tokenize: shard 00001 ({corpus['inputs'][1]}) failed (node lost); retry 1 of 2"]


def _kill_in(stage: str, monkeypatch) -> None:
    """SIGKILL the process running ``stage`` midway through one of its tasks: nothing gets to clean up."""
    from data import staged as staged_module
    from data.format import PackedWriter

    if stage == "tokenize":  # shard 3's tokens are written, its lengths not yet renamed
        real = staged_module._save_array

        def save(path, array):
            tmp = real(path, array)
            if path.name.startswith("00003"):
                os.kill(os.getpid(), signal.SIGKILL)
            return tmp

        monkeypatch.setattr(staged_module, "_save_array", save)
    else:  # part 1 after a few of its rows
        real_add = PackedWriter.add_row

        def add_row(self, *a, **k):
            real_add(self, *a, **k)
            if self.prefix.endswith("00001") and self.rows == 5:
                os.kill(os.getpid(), signal.SIGKILL)

        monkeypatch.setattr(PackedWriter, "add_row", add_row)


@pytest.mark.parametrize("stage", ["tokenize", "write"])
def test_a_stage_killed_midway_resumes_to_the_same_output(corpus, single, tmp_path, local, monkeypatch, stage):
    out = tmp_path / "sp"
    with monkeypatch.context() as patch:
        _kill_in(stage, patch)
        with pytest.raises(StageFailed, match=r"failed: .*(terminated|BrokenProcessPool|abruptly)"):
            staged(corpus, out, "sp", local, retries=0)
    assert not any(p.exists() for p in dataset_files(out))  # nothing that looks complete
    leftovers = list((tmp_path / "work").rglob("*.tmp*"))
    assert leftovers  # the killed task's partial files, under temporary names
    done = {p: p.stat().st_mtime_ns for p in (tmp_path / "work" / "shards").glob("*.json")}
    staged(corpus, out, "sp", local)
    assert_same_rows(out, single["sp"])
    assert not list((tmp_path / "work").rglob("*.tmp*"))  # the rerun removed them
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())  # complete shards were not redone


def test_submitit_local_backend_runs_the_stages(corpus, single, tmp_path):
    # 2 shards and 1 part, so 4 waves of jobs (2 tokenize, plan, write, merge): each job is two Python processes
    executor = SubmititExecutor(tmp_path / "logs", cluster="local", timeout_min=10)
    staged(corpus, tmp_path / "concat", "concat", executor, files_per_shard=3, parts=1)
    assert_same_rows(tmp_path / "concat", single["concat"])
    assert list((tmp_path / "logs").glob("*_0_log.out"))  # submitit's own job folders: it ran them


def test_damaged_or_missing_shards_are_one_line(corpus, tmp_path, capsys):
    from tools import pack

    args = ["--input", *corpus["inputs"], "--tokenizer", str(corpus["tok"].path), "--seq-len", str(L),
            "--output", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"), "--no-progress", "--jobs", "2"]
    assert pack.main([*args, "--stage", "tokenize"]) == 0
    shard = shard_prefix(tmp_path / "work", 1)
    tokens = Path(f"{shard}.tokens")
    record = json.loads(Path(f"{shard}.json").read_text())
    cases = [  # (damage, what the one line must say)
        (lambda: tokens.write_bytes(tokens.read_bytes()[:-2]), f"shard 00001 is damaged: {tokens} is"),
        (lambda: Path(f"{shard}.json").unlink(), f"shard 00001 is missing ({shard}.json)"),
        (lambda: Path(f"{shard}.json").write_text(json.dumps(
            {**record, "tokenizer": {**record["tokenizer"], "sha256_16": "0" * 16}})), "was tokenized with tokenizer"),
    ]
    for damage, expected in cases:
        undamaged = {p: p.read_bytes() for p in shard.parent.glob(f"{shard.name}.*")}
        damage()
        code = pack.main([*args, "--stage", "plan"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and expected in err[0], (expected, err)
        for p, data in undamaged.items():
            p.write_bytes(data)
    # and the tokenize stage redoes a damaged shard, leaving the others
    tokens.write_bytes(b"")
    others = {p: p.stat().st_mtime_ns for p in shard.parent.glob("*.json") if p.name != f"{shard.name}.json"}
    time.sleep(0.01)
    assert pack.main([*args, "--stage", "tokenize"]) == 0
    assert tokens.stat().st_size == record["corpus_tokens"] * 2
    assert all(p.stat().st_mtime_ns == t for p, t in others.items())
    # a node whose tokenizer file differs from the one the pack started with refuses to tokenize
    task = TokenizeTask(tmp_path / "work", 0, DocumentSource(corpus["inputs"]).split(1)[0], str(corpus["tok"].path),
                        fingerprint="0" * 16)
    with pytest.raises(InputError, match=f"shard 00000 .*has fingerprint {corpus['tok'].fingerprint()}"):
        task()
    with pytest.raises(InputError, match="--compare and --work-dir"):
        pack._pack_staged(pack.build_parser().parse_args([*args, "--compare"]), corpus["tok"], None, {})
