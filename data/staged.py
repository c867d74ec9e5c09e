"""The packer in three restartable stages, for corpora packed on more than one machine.

1. **tokenize**: each shard (a contiguous slice of the inputs, in the order the single-machine packer
   reads them) becomes a token file and its documents' lengths, under ``WORK/shards/``.
2. **plan**: on one node, the lengths of every shard end to end (global document numbers, so that ties
   break as on one machine), the method's plan over them (`pipeline.plan_corpus`) and the one row
   permutation (`pipeline.row_order`), under ``WORK/plans/KEY/``.
3. **write**: contiguous slices of that permutation, each a packed dataset of its own under
   ``WORK/parts/KEY/`` (`pipeline.write_rows`), then **merge** them in order into the output.

They are the single-machine packer's own functions split at its seams, so the merged rows are the
same bytes `pipeline.pack_documents` writes for the same corpus, method and seed. Every file is
written under a temporary name and renamed when complete (a JSON record last): a rerun skips what is
complete and redoes the rest, and nothing partial is ever read as complete. A task is a small
picklable object; `data/executors.py` runs a stage's tasks on this machine, on Slurm or on Ray.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data.executors import STAGES, run_stage
from data.format import PackedWriter, check_index, dataset_exists, remove_dataset, remove_leftovers, temporary_name
from data.packing import Plan
from data.pipeline import (packed_metadata, pack_settings, plan_corpus, require_documents, row_order, tokenize_corpus,
                           write_rows, _progress)
from data.sources import DocumentSource, InputError, check_settings
from data.tokenizer import load_tokenizer
from data.window import document_offsets

_CORPUS_STATS = ("documents", "empty_documents", "corpus_tokens", "text_tokens", "replacement_char_documents",
                 "tokenize_seconds")
_PLAN_ARRAYS = ("src", "length", "row_ptr", "order")


def _write_json(path: Path, record: dict) -> None:
    """A record renamed into place: it marks the files beside it complete."""
    tmp = Path(temporary_name(path))
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    """A record, or None when it is missing or unreadable (records are renamed into place whole, so an unreadable
    one was damaged after: its task is redone)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _save_array(path: Path, array: np.ndarray) -> Path:
    tmp = Path(temporary_name(path))
    with open(tmp, "wb") as f:  # a file object: np.save would append .npy to the temporary name
        np.save(f, array)
    return tmp


# --- 1. tokenize ----------------------------------------------------------------------------------
def shard_prefix(work: Path, index: int) -> Path:
    return Path(work) / "shards" / f"{index:05d}"


def shard_problem(work: Path, index: int, record: dict | None) -> str | None:
    """Why shard ``index`` cannot be used (missing, or its files disagree with its record), or None."""
    prefix = shard_prefix(work, index)
    if record is None:
        return f"shard {index:05d} is missing ({prefix}.json); run --stage tokenize (it redoes only such shards)"
    tokens, lengths = Path(f"{prefix}.tokens"), Path(f"{prefix}.lengths.npy")
    want = record["corpus_tokens"] * np.dtype(record["dtype"]).itemsize
    if not tokens.is_file() or tokens.stat().st_size != want:
        size = f"{tokens.stat().st_size} bytes" if tokens.is_file() else "missing"
        return (f"shard {index:05d} is damaged: {tokens} is {size}, its record says {want} bytes; "
                "run --stage tokenize (it redoes damaged shards)")
    try:
        n = np.load(lengths, mmap_mode="r")
        ok = n.shape == (record["documents"],) and int(n.sum()) == record["corpus_tokens"]
    except (OSError, ValueError):
        ok = False
    if not ok:
        return f"shard {index:05d} is damaged: {lengths} disagrees with its record; run --stage tokenize"
    return None


@dataclass
class TokenizeTask:
    """Tokenize one shard into WORK/shards/NNNNN.{tokens,lengths.npy,json}; a complete shard is skipped."""

    work: Path
    index: int
    source: DocumentSource
    tokenizer: str
    fingerprint: str  # of the tokenizer the pack started with: every shard must be tokenized with it
    workers: int = 1

    @property
    def name(self) -> str:
        names = self.source.names()
        return f"shard {self.index:05d} ({names[0]}{f' +{len(names) - 1} more' if len(names) > 1 else ''})"

    def __call__(self) -> dict:
        prefix = shard_prefix(self.work, self.index)
        done = _read_json(Path(f"{prefix}.json"))
        if done and done["inputs"] == self.source.names() and done["tokenizer"]["sha256_16"] == self.fingerprint:
            if shard_problem(self.work, self.index, done) is None:
                return {**done, "skipped": True}
        # 1. The tokenizer on this node must be the one the pack started with.
        tok = load_tokenizer(self.tokenizer)
        if tok.fingerprint() != self.fingerprint:
            raise InputError(f"{self.name}: the tokenizer {self.tokenizer} here has fingerprint {tok.fingerprint()}, "
                             f"the pack was started with {self.fingerprint}; give every node the same tokenizer file")
        # 2. Tokenize under temporary names, then rename, the record last.
        prefix.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{prefix}.json").unlink(missing_ok=True)  # a stale or damaged shard is no longer complete
        remove_leftovers(prefix)  # of a run of this shard that was killed
        tokens = Path(temporary_name(f"{prefix}.tokens"))
        cpu = time.process_time()
        try:
            corpus = tokenize_corpus(self.source, tok, tokens, workers=self.workers, progress=False)
            lengths = _save_array(Path(f"{prefix}.lengths.npy"), np.diff(corpus.offsets))
        except BaseException:
            tokens.unlink(missing_ok=True)
            raise
        record = {"shard": self.index, "inputs": self.source.names(), "tokenizer": tok.describe(),
                  "dtype": np.dtype(corpus.dtype).name, "rows_missing_text_field": len(self.source.skipped),
                  "cpu_seconds": time.process_time() - cpu, **corpus.stats}
        os.replace(tokens, f"{prefix}.tokens")
        os.replace(lengths, f"{prefix}.lengths.npy")
        _write_json(Path(f"{prefix}.json"), record)
        return record


def read_shards(work: Path, shards: int, fingerprint: str) -> list[dict]:
    """Every shard's record, checked: present, its files whole, the same tokenizer for all."""
    records = []
    for i in range(shards):
        record = _read_json(Path(f"{shard_prefix(work, i)}.json"))
        if problem := shard_problem(work, i, record):
            raise InputError(problem)
        if record["tokenizer"]["sha256_16"] != fingerprint:
            raise InputError(f"shard {i:05d} ({shard_prefix(work, i)}.json) was tokenized with tokenizer "
                             f"{record['tokenizer']['sha256_16']}, this pack uses {fingerprint}; use another "
                             "--work-dir or delete that shard and rerun --stage tokenize")
        records.append(record)
    return records


class ShardedStream:
    """The shards' token files as one stream. A plan's piece never crosses a document, so never a shard."""

    def __init__(self, work: Path, records: list[dict]):
        self.dtype = np.dtype(records[0]["dtype"])
        self.starts = np.concatenate([[0], np.cumsum([r["corpus_tokens"] for r in records])]).tolist()
        self.maps = [np.memmap(f"{shard_prefix(work, r['shard'])}.tokens", self.dtype, mode="r")
                     if r["corpus_tokens"] else np.zeros(0, self.dtype) for r in records]

    def __getitem__(self, piece: slice) -> np.ndarray:
        i = bisect.bisect_right(self.starts, piece.start) - 1  # past empty shards (equal starts)
        base = self.starts[i]
        return self.maps[i][piece.start - base:piece.stop - base]


# --- 2. plan --------------------------------------------------------------------------------------
@dataclass
class PlanTask:
    """The global plan over every shard's lengths, and the row permutation, under WORK/plans/KEY/."""

    work: Path
    shards: int
    fingerprint: str
    method: str
    seq_len: int
    overlap_ratio: float = 0.3
    extra_capacity: int = 50
    underfull: str = "concat"
    seed: int = 0
    parts: int = 0  # output parts the write stage writes in parallel; 0: one per shard
    name: str = "plan"

    def key(self, records: list[dict]) -> str:
        """Names the plan by everything it depends on: its settings and the shards' contents."""
        what = {"method": self.method, "seq_len": self.seq_len, "overlap_ratio": self.overlap_ratio,
                "extra_capacity": self.extra_capacity, "underfull": self.underfull, "seed": self.seed,
                "parts": self.parts, "shards": [(r["inputs"], r["corpus_tokens"], r["documents"]) for r in records],
                "tokenizer": self.fingerprint}
        return f"{self.method}-{hashlib.sha256(json.dumps(what).encode()).hexdigest()[:12]}"

    def __call__(self) -> dict:
        records = read_shards(self.work, self.shards, self.fingerprint)
        key = self.key(records)
        folder = Path(self.work) / "plans" / key
        if (done := _read_json(folder / "plan.json")) is not None:
            return {**done, "skipped": True}
        # 1. The corpus as one: global document numbers, the same statistics as one machine's.
        start = time.perf_counter()
        lengths = np.concatenate([np.load(f"{shard_prefix(self.work, r['shard'])}.lengths.npy") for r in records])
        corpus = {k: sum(r[k] for r in records) for k in _CORPUS_STATS}
        require_documents(corpus)
        offsets = document_offsets(lengths)
        # 2. The plan and the one permutation every part writes a slice of.
        plan, stats = plan_corpus(self.method, offsets, corpus, self.seq_len, self.overlap_ratio,
                                  self.extra_capacity, self.underfull)
        order = row_order(plan.rows, self.seed)
        parts = max(1, min(self.parts or self.shards, plan.rows))
        record = {"key": key, "method": self.method, "seq_len": self.seq_len, "shards": self.shards,
                  "tokenizer": records[0]["tokenizer"], "stats": stats, "seconds": time.perf_counter() - start,
                  "tokens": corpus["corpus_tokens"], "rows_missing_text_field": sum(
                      r["rows_missing_text_field"] for r in records),
                  "part_bounds": np.linspace(0, plan.rows, parts + 1).astype(np.int64).tolist(),
                  "settings": pack_settings(self.seq_len, self.overlap_ratio, self.extra_capacity, self.underfull,
                                            self.seed, workers=1)}
        # 3. Into a folder of its own, renamed into place whole.
        tmp = Path(temporary_name(folder))
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, array in zip(_PLAN_ARRAYS, (plan.src, plan.length, plan.row_ptr, order)):
            np.save(tmp / f"{name}.npy", array)
        (tmp / "plan.json").write_text(json.dumps(record, indent=2, sort_keys=True))
        for stale in folder.parent.glob(f"{key}.tmp*"):  # of killed runs (a plan has one planner)
            if stale != tmp:
                shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, folder)
        return record


def read_plan(work: Path, key: str) -> tuple[dict, Plan, np.ndarray]:
    """(record, plan, row order), the arrays memory-mapped; a missing plan is one line."""
    folder = Path(work) / "plans" / key
    record = _read_json(folder / "plan.json")
    if record is None:
        raise InputError(f"the plan {folder} is missing; run --stage plan")
    src, length, row_ptr, order = (np.load(folder / f"{name}.npy", mmap_mode="r") for name in _PLAN_ARRAYS)
    return record, Plan(src, length, np.zeros(0, np.int64), row_ptr), order


# --- 3. write and merge ---------------------------------------------------------------------------
def part_prefix(work: Path, key: str, part: int) -> Path:
    return Path(work) / "parts" / key / f"{part:05d}"


def part_problem(prefix: Path, key: str) -> str | None:
    record = _read_json(Path(f"{prefix}.json"))
    if record is None or record.get("plan") != key:
        return f"part {prefix} is missing; run --stage write (it writes only the missing parts)"
    token_problems, _ = check_index(str(prefix), np.dtype(record["dtype"]), record["seq_len"])
    bound_problems, _ = check_index(f"{prefix}.bounds", np.int32, None)
    if problems := token_problems + bound_problems:
        return f"part {prefix} is damaged: {problems[0]}; delete {prefix}.json and rerun --stage write"
    return None


@dataclass
class WriteTask:
    """Rows part_bounds[part]..part_bounds[part + 1] of the permutation, as a packed dataset of their own."""

    work: Path
    key: str
    part: int

    @property
    def name(self) -> str:
        return f"part {self.part:05d} of {self.key}"

    def __call__(self) -> dict:
        prefix = part_prefix(self.work, self.key, self.part)
        if part_problem(prefix, self.key) is None:
            return {**_read_json(Path(f"{prefix}.json")), "skipped": True}
        start, cpu = time.perf_counter(), time.process_time()
        record, plan, order = read_plan(self.work, self.key)
        records = read_shards(self.work, record["shards"], record["tokenizer"]["sha256_16"])
        remove_leftovers(prefix)  # of a run of this part that was killed
        lo, hi = record["part_bounds"][self.part:self.part + 2]
        tok = record["tokenizer"]
        writer = PackedWriter(prefix, record["seq_len"], tok["vocab_size"])
        try:
            with _progress(False) as bar:
                tokens = write_rows(plan, ShardedStream(self.work, records), writer, tok["pad"], order[lo:hi], bar)
            return writer.finalize({"tokenizer": tok, "plan": self.key, "part": self.part, "first_row": lo,
                                    "tokens": tokens, "seconds": time.perf_counter() - start,
                                    "cpu_seconds": time.process_time() - cpu})
        except BaseException:
            writer.abort()
            raise


@dataclass
class MergeTask:
    """The parts, in order, into the output dataset: its rows are the single-machine packer's."""

    work: Path
    key: str
    output: str
    metadata: dict = field(default_factory=dict)
    name: str = "merge"

    def __call__(self) -> dict:
        done = _read_json(Path(f"{self.output}.json"))
        if done and done.get("staged", {}).get("plan") == self.key:
            return {**done, "skipped": True}
        record, _, _ = read_plan(self.work, self.key)
        parts = [part_prefix(self.work, self.key, p) for p in range(len(record["part_bounds"]) - 1)]
        for prefix in parts:  # every part whole before anything is written
            if problem := part_problem(prefix, self.key):
                raise InputError(problem)
        start = time.perf_counter()
        writer = PackedWriter(self.output, record["seq_len"], record["tokenizer"]["vocab_size"])
        try:
            for prefix in parts:
                writer.add_dataset(prefix)
            write_s = sum(_read_json(Path(f"{p}.json"))["seconds"] for p in parts) + time.perf_counter() - start
            stats = record["stats"]
            metadata = {**self.metadata, "staged": {"plan": self.key, "work_dir": str(Path(self.work).resolve()),
                                                    "shards": record["shards"], "parts": len(parts),
                                                    "seconds_are": "task seconds summed over shards and parts"}}
            metadata.setdefault("source", {})["rows_missing_text_field"] = record["rows_missing_text_field"]
            meta = packed_metadata(record["tokenizer"], record["method"], record["settings"], stats,
                                   (stats["tokenize_seconds"], record["seconds"], write_s), metadata)
            if dataset_exists(self.output):  # the driver allowed it (--overwrite, or this work's own output)
                remove_dataset(self.output)  # just before the rename, so a failed run keeps the old dataset
            return writer.finalize(meta)
        except BaseException:
            writer.abort()
            raise


# --- the three stages in order --------------------------------------------------------------------


def check_staged_output(output: str, work: Path, overwrite: bool) -> None:
    """An existing output is replaced only with --overwrite, or when this work folder wrote it (a rerun)."""
    meta = _read_json(Path(f"{output}.json"))
    ours = meta is not None and meta.get("staged", {}).get("work_dir") == str(Path(work).resolve())
    if dataset_exists(output) and not (overwrite or ours):
        raise InputError(f"output {output} already exists; pass --overwrite or choose another --output")


def pack_staged(source: DocumentSource, tokenizer, seq_len: int, method: str, output: str, work: str | Path,
                executor, *, stages: tuple[str, ...] = STAGES, files_per_shard: int = 1, parts: int = 0,
                workers: int = 1, overlap_ratio: float = 0.3, extra_capacity: int = 50, underfull: str = "concat",
                seed: int = 0, retries: int = 2, progress: bool = True, metadata: dict | None = None) -> dict:
    """Run ``stages`` of a staged pack under ``executor`` (data/executors.py); returns the plan's record (its
    ``stats`` are the table's) and, once written, the output's metadata as ``meta``."""
    check_settings(seq_len, method, overlap_ratio, extra_capacity, underfull, workers)
    work, output = Path(work).resolve(), str(Path(output).resolve())  # the same files from every node
    shards = source.split(files_per_shard)
    fingerprint = tokenizer.fingerprint()
    plan_task = PlanTask(work, len(shards), fingerprint, method, seq_len, overlap_ratio, extra_capacity, underfull,
                         seed, parts)
    run = dict(retries=retries, progress=progress)
    if "tokenize" in stages:
        model = str(Path(tokenizer.path).resolve())
        run_stage(executor, "tokenize", [TokenizeTask(work, i, s, model, fingerprint, workers)
                                         for i, s in enumerate(shards)], unit="shards", **run)
    record = {}
    if "plan" in stages:
        [record] = run_stage(executor, "plan", [plan_task], **run)
    elif "write" in stages:
        record, _, _ = read_plan(work, plan_task.key(read_shards(work, len(shards), fingerprint)))
    if "write" in stages:
        key = record["key"]
        run_stage(executor, "write", [WriteTask(work, key, p) for p in range(len(record["part_bounds"]) - 1)],
                  unit="parts", **run)
        [record["meta"]] = run_stage(executor, "merge", [MergeTask(work, key, output, dict(metadata or {}))], **run)
    return record
