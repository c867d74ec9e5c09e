"""The packed-dataset format shared by `tools/pack.py` and the trainer.

A dataset with prefix P is four files plus one JSON:

- ``P.bin`` / ``P.idx``: megatron-core's indexed format. Every sequence is one row of exactly
  ``seq_len`` tokens, so megatron-core's ``IndexedDataset`` (and Megatron-LM's ``GPTDataset``)
  read it as is.
- ``P.bounds.bin`` / ``P.bounds.idx``: a second indexed dataset, row for row: the offsets where
  documents start inside the row, followed by the offset where real content ends (``seq_len``
  unless the row is padded; padding is always at the end and is masked out of the loss).
- ``P.json``: metadata (tokenizer, seq_len, method, statistics). It is written last, after the
  binaries are renamed into place, so a dataset without its JSON is incomplete by construction.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from data.errors import DataError, DataNotFound
from models import megatron_release

if TYPE_CHECKING:  # torch only where a batch is made: a staged pack's tokenize tasks start without it
    import torch

FORMAT_VERSION = 1
_SUFFIXES = (".bin", ".idx", ".bounds.bin", ".bounds.idx", ".json")
_MAGIC = b"MMIDIDX\x00\x00"  # megatron-core's indexed format (indexed_dataset.py)
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, row count, document count
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
           8: np.uint16}


def token_dtype(vocab_size: int) -> type[np.number]:
    """The smallest dtype megatron-core's indexed format stores for this vocabulary."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size < 65_500:
        return np.uint16
    if vocab_size < 2**31:
        return np.int32
    raise DataError(f"vocabulary of {vocab_size} tokens does not fit int32; use a smaller tokenizer")


def dataset_files(prefix: str | Path) -> list[Path]:
    return [Path(f"{prefix}{s}") for s in _SUFFIXES]


def dataset_exists(prefix: str | Path) -> bool:
    return any(p.exists() for p in dataset_files(prefix))


def remove_dataset(prefix: str | Path) -> None:
    for p in dataset_files(prefix):
        p.unlink(missing_ok=True)


def temporary_name(path: str | Path) -> str:
    """Where this process writes `path` before renaming it into place. The name is its own, so that
    processes building the same file at once (a multirun's workers on an empty cache) never write into
    one another's file; each rename then puts a whole file in place."""
    return f"{path}.tmp{os.getpid()}"


def remove_leftovers(prefix: str | Path) -> list[Path]:
    """Delete the temporary files (`temporary_name`) of builds of `prefix` that were killed before they
    could clean up; returns them. Only for a caller that alone builds `prefix` (it holds its build lock):
    a temporary file that is not its own then belongs to no live build."""
    prefix = Path(prefix)
    # PREFIX[.SUFFIX].tmpPID, and a tokenizer's PREFIX.tmpPID.model
    temporary = re.compile(re.escape(prefix.name) + r"(\.[\w.]+)?\.tmp(?P<pid>\d+)(\.\w+)?")
    found = [p for p in prefix.parent.glob(f"{prefix.name}.*")
             if (m := temporary.fullmatch(p.name)) and int(m["pid"]) != os.getpid()]
    for p in found:
        p.unlink(missing_ok=True)
    return found


def _append_indexed(builder, prefix: str, lengths: np.ndarray) -> None:
    """megatron's `IndexedDatasetBuilder.add_index` for a checked dataset of one document per row, less its
    `gc.collect()` per call (0.5 s each with torch loaded: minutes over the parts of a large corpus)."""
    offset = len(builder.sequence_lengths)
    builder.sequence_lengths.extend(lengths.tolist())
    builder.document_indices.extend(range(offset + 1, offset + lengths.size + 1))
    with open(f"{prefix}.bin", "rb") as f:
        shutil.copyfileobj(f, builder.data_file)


class PackedWriter:
    """Streams rows to disk under temporary names; `finalize` renames them into place.

    A crash (or a full disk) before `finalize` leaves only ``*.tmpPID`` files, never a dataset that
    loads as if complete.
    """

    def __init__(self, prefix: str | Path, seq_len: int, vocab_size: int):
        megatron_release.import_megatron()
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        if seq_len < 2:
            raise DataError(f"seq_len must be at least 2, got {seq_len}")
        self.prefix = str(prefix)
        self.seq_len = seq_len
        self.dtype = token_dtype(vocab_size)
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._tmp_names = {suffix: temporary_name(f"{self.prefix}{suffix}") for suffix in _SUFFIXES}
        self._tokens = IndexedDatasetBuilder(self._tmp(".bin"), dtype=self.dtype)
        self._bounds = IndexedDatasetBuilder(self._tmp(".bounds.bin"), dtype=np.int32)
        self.rows = 0
        self.max_token_id = -1  # recorded in the metadata: opening checks it against the vocabulary

    def _tmp(self, suffix: str) -> str:
        return self._tmp_names[suffix]

    def add_row(self, tokens: np.ndarray, doc_starts: np.ndarray | list[int], content_end: int | None = None) -> None:
        """Append one row; ``doc_starts`` are offsets where documents begin within the row."""
        tokens = np.asarray(tokens)
        if tokens.shape != (self.seq_len,):
            raise ValueError(f"row has {tokens.shape} tokens, expected exactly ({self.seq_len},)")
        end = self.seq_len if content_end is None else int(content_end)
        bounds = np.append(np.asarray(doc_starts, dtype=np.int32), np.int32(end))
        self._tokens.add_document(tokens.astype(self.dtype, copy=False), [self.seq_len])
        self.max_token_id = max(self.max_token_id, int(tokens.max()))
        self._bounds.add_document(bounds, [len(bounds)])
        self.rows += 1

    def add_dataset(self, prefix: str | Path) -> None:
        """Append every row of the packed dataset ``prefix`` (a part of a staged pack) by copying its files."""
        meta = read_metadata(Path(f"{prefix}.json"))
        if meta["seq_len"] != self.seq_len or meta.get("dtype") != np.dtype(self.dtype).name:
            raise DataError(f"{prefix} has rows of {meta['seq_len']} {meta.get('dtype')} tokens, this dataset "
                            f"{self.seq_len} {np.dtype(self.dtype).name}; merge only parts of one plan")
        for builder, pair, dtype, length in ((self._tokens, str(prefix), self.dtype, self.seq_len),
                                             (self._bounds, f"{prefix}.bounds", np.int32, None)):
            problems, lengths = check_index(pair, dtype, length)
            if problems:
                raise DataError(f"cannot merge {prefix}: {problems[0]}")
            _append_indexed(builder, pair, lengths)
        self.rows += int(meta["rows"])
        self.max_token_id = max(self.max_token_id, int(meta["max_token_id"]))

    def finalize(self, metadata: dict) -> dict:
        """Write the index files and metadata, then rename everything into place (JSON last)."""
        self._tokens.finalize(self._tmp(".idx"))
        self._bounds.finalize(self._tmp(".bounds.idx"))
        meta = {"format_version": FORMAT_VERSION, "seq_len": self.seq_len, "rows": self.rows,
                "dtype": np.dtype(self.dtype).name, "max_token_id": self.max_token_id, **metadata}
        with open(self._tmp(".json"), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        for suffix in _SUFFIXES:
            os.replace(self._tmp(suffix), f"{self.prefix}{suffix}")
        return meta

    def abort(self) -> None:
        for suffix in _SUFFIXES:
            Path(self._tmp(suffix)).unlink(missing_ok=True)


def check_index(prefix: str, dtype, row_length: int | None) -> tuple[list[str], np.ndarray | None]:
    """Problems of `prefix`.idx/.bin as a pair, and the row lengths when the structure holds.
    `row_length`: every row must have exactly this many items (None: at least two)."""
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for path in (idx, bin_):
        if not path.is_file():
            return [f"{path} is missing"], None
    raw = idx.read_bytes()
    # 1. the header
    if len(raw) < _HEADER.size:
        return [f"{idx} is {len(raw)} bytes, shorter than its {_HEADER.size}-byte header"], None
    magic, version, code, rows, docs = _HEADER.unpack_from(raw)
    if magic != _MAGIC:
        return [f"{idx} does not start with megatron's index header {_MAGIC!r}"], None
    if version != 1:
        return [f"{idx} has index version {version}, not 1"], None
    if _DTYPES.get(code) != np.dtype(dtype):
        return [f"{idx} stores dtype code {code}, the dataset needs {np.dtype(dtype).name}"], None
    # 2. the counts against the file's own size: lengths (int32), pointers (int64), documents (int64)
    expected = _HEADER.size + 4 * rows + 8 * rows + 8 * docs
    if len(raw) != expected:
        return [f"{idx} is {len(raw)} bytes, its header ({rows} rows, {docs} documents) implies {expected}"], None
    lengths = np.frombuffer(raw, np.int32, rows, _HEADER.size).astype(np.int64)
    pointers = np.frombuffer(raw, np.int64, rows, _HEADER.size + 4 * rows)
    documents = np.frombuffer(raw, np.int64, docs, _HEADER.size + 12 * rows)
    problems = []
    # 3. every row: its length, and a pointer exactly where the previous row ends
    bad = np.flatnonzero(lengths != row_length) if row_length else np.flatnonzero(lengths < 2)
    if bad.size:
        want = f"exactly {row_length}" if row_length else "at least 2"
        problems.append(f"{idx}: {bad.size} rows do not hold {want} items (first: row {bad[0]}, {lengths[bad[0]]})")
    itemsize = np.dtype(dtype).itemsize
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) * itemsize
    bad = np.flatnonzero(pointers != starts)
    if bad.size:
        problems.append(f"{idx}: {bad.size} row pointers are not where the previous row ends "
                        f"(first: row {bad[0]} points at byte {pointers[bad[0]]}, not {starts[bad[0]]})")
    if docs != rows + 1 or (documents != np.arange(docs)).any():
        problems.append(f"{idx}: the document index is not one document per row (0..{rows})")
    # 4. the data file holds exactly what the index describes
    size = bin_.stat().st_size
    if size != int(lengths.sum()) * itemsize:
        problems.append(f"{bin_} is {size} bytes, its index describes {int(lengths.sum()) * itemsize}")
    return problems, (None if problems else lengths)


def read_metadata(path: Path) -> dict:
    """A packed dataset's JSON metadata, checked for what the reader needs; any other file is one line."""
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not a packed dataset's metadata ({type(e).__name__}: {str(e).splitlines()[0]}); "
                        "re-pack the corpus with tools/pack.py") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path} holds a JSON {type(meta).__name__}, not a packed dataset's metadata; re-pack the "
                        "corpus with tools/pack.py")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path} has format_version {meta.get('format_version')}, keel reads {FORMAT_VERSION}; "
                        "re-pack the corpus")
    tokenizer = meta.get("tokenizer")
    sizes = (meta.get("seq_len"), tokenizer.get("vocab_size") if isinstance(tokenizer, dict) else None)
    if not all(type(size) is int for size in sizes):
        raise DataError(f"{path} lacks seq_len or the tokenizer's vocab_size; re-pack the corpus with tools/pack.py")
    return meta


@dataclass
class PackedRow:
    tokens: np.ndarray  # [seq_len]
    doc_starts: np.ndarray  # offsets where documents begin
    content_end: int  # tokens at or after this offset are padding


class PackedDataset:
    """Memory-mapped reader of a packed dataset, through megatron-core's IndexedDataset."""

    def __init__(self, prefix: str | Path):
        megatron_release.import_megatron()
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefix = str(prefix)
        meta_path = Path(f"{self.prefix}.json")
        if not meta_path.exists():
            raise DataNotFound(
                f"packed dataset {self.prefix!r} not found or incomplete (no {meta_path.name}); "
                "create it with `python tools/pack.py --output PREFIX ...`")
        self.meta = read_metadata(meta_path)
        self.seq_len = int(self.meta["seq_len"])
        # the structure first, independently of megatron's reader (which asserts, and trusts pointers)
        for pair, dtype, length in ((self.prefix, token_dtype(self.vocab_size), self.seq_len),
                                    (f"{self.prefix}.bounds", np.int32, None)):
            problems, _ = check_index(pair, dtype, length)
            if problems:
                raise DataError(f"packed dataset {self.prefix} is damaged: {problems[0]}; re-pack it "
                                f"(`python tools/pack.py --verify {self.prefix}` lists every problem)")
        self.tokens = IndexedDataset(self.prefix)
        self.bounds = IndexedDataset(f"{self.prefix}.bounds")
        if len(self.tokens) != len(self.bounds):
            raise DataError(f"{self.prefix}: {len(self.tokens)} rows but {len(self.bounds)} boundary rows; re-pack")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["tokenizer"]["vocab_size"])

    def max_token_id(self) -> int:
        """The largest token id in the rows: recorded at pack time; a set packed before keel recorded it is
        scanned once, and the value recorded in its metadata when the file can be written."""
        if isinstance(self.meta.get("max_token_id"), int):
            return self.meta["max_token_id"]
        rows = np.memmap(f"{self.prefix}.bin", dtype=token_dtype(self.vocab_size), mode="r")
        self.meta["max_token_id"] = int(rows.max()) if rows.size else -1
        path = Path(f"{self.prefix}.json")
        tmp = Path(temporary_name(path))
        try:
            tmp.write_text(json.dumps(self.meta, indent=2, sort_keys=True))
            os.replace(tmp, path)
        except OSError:  # a read-only dataset is scanned at every open instead
            tmp.unlink(missing_ok=True)
        return self.meta["max_token_id"]

    def row(self, i: int) -> PackedRow:
        b = self.bounds[i]
        return PackedRow(tokens=self.tokens[i], doc_starts=b[:-1], content_end=int(b[-1]))

    def batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        """Tokens, per-token document ids and a loss mask for a list of rows."""
        import torch

        tokens = np.stack([self.tokens[int(i)] for i in indices]).astype(np.int64)
        if tokens.size and int(tokens.max()) >= self.vocab_size:  # a damaged .bin: never train on it silently
            row = int(indices[int(np.argmax(tokens.max(axis=1)))])
            raise DataError(f"{self.prefix}.bin row {row} holds token id {int(tokens.max())}, past the "
                            f"{self.vocab_size}-token vocabulary; the file is damaged: re-pack it "
                            f"(`python tools/pack.py --verify {self.prefix}` lists every problem)")
        doc_ids = np.zeros_like(tokens)
        loss_mask = np.ones(tokens.shape, dtype=np.float32)
        for r, i in enumerate(indices):
            row = self.row(int(i))
            starts = row.doc_starts[row.doc_starts > 0]
            doc_ids[r, starts] = 1
            loss_mask[r, row.content_end:] = 0.0
        doc_ids = np.cumsum(doc_ids, axis=1)
        return {"tokens": torch.from_numpy(tokens), "doc_ids": torch.from_numpy(doc_ids),
                "loss_mask": torch.from_numpy(loss_mask)}
