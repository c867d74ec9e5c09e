"""The packer's inputs: local files read through Hugging Face ``datasets``, the stdlib corpus, settings.

Formats, by extension: ``.jsonl``/``.ndjson``/``.json`` (JSON lines or a JSON array of objects),
``.parquet``, ``.arrow``; anything else is plain text, one document per file (``text_mode="file"``)
or per line (``"line"``). Structured formats take the document from ``text_field``.

``stdlib[:SUBSET[:SPLIT]]`` names the default corpus (data.corpus): SUBSET is all, code, tests,
code-defs, tests-defs, code-nodoc (code without its docstrings) or prose (docstrings and help() topics),
SPLIT is all, train or val.

Encoding policy: input files must be UTF-8. A file that is not fails the run with an error naming
the file and the fix (convert it), rather than silently replacing bytes in user data. The stdlib
corpus is the exception: data.corpus replaces the few invalid bytes it holds (a test fixture), and
the pipeline counts documents holding U+FFFD as ``replacement_char_documents``. Empty documents
(and blank lines in line mode) are passed on; the pipeline skips and counts them.

Only local files are read: ``HF_DATASETS_OFFLINE`` is set, and inputs are loaded in streaming mode
so nothing is copied into the datasets cache.
"""

from __future__ import annotations

import codecs
import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from data.corpus import STDLIB, STDLIB_SUBSETS, Document, expand_inputs, stdlib_documents
from data.errors import DataError
from data.packing import METHODS, UNDERFULL

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

FORMATS = {".jsonl": "json", ".ndjson": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
TEXT_MODES = ("file", "line")
STDLIB_SPLITS = ("all", "train", "val")


class InputError(DataError):
    """A problem with the packer's input or settings; the message names the problem and the fix."""


def check_settings(seq_len: int, method: str, overlap_ratio: float = 0.3, extra_capacity: int = 50,
                   underfull: str = "concat", workers: int = 1) -> None:
    """Reject bad settings before any heavy work; each message names the fix."""
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if seq_len < 2:
        raise InputError(f"sequence length must be at least 2, got {seq_len}; pass --seq-len 2 or more")
    if not 0.0 <= overlap_ratio < 1.0:
        raise InputError(f"overlap ratio must be in [0, 1), got {overlap_ratio}; e.g. --overlap-ratio 0.3")
    if extra_capacity < 0:
        raise InputError(f"extra capacity must be >= 0, got {extra_capacity}; e.g. --extra-capacity 50")
    if underfull not in UNDERFULL:
        raise InputError(f"unknown underfull policy {underfull!r}; choose one of {', '.join(UNDERFULL)}")
    if workers < 1:
        raise InputError(f"workers must be >= 1, got {workers}")


def file_format(path: str | Path) -> str:
    """The `datasets` builder for a file: json, parquet, arrow or text."""
    return FORMATS.get(Path(path).suffix.lower(), "text")


def parse_stdlib(spec: str) -> tuple[str, str] | None:
    """(subset, split) for ``stdlib[:SUBSET[:SPLIT]]``; None when ``spec`` names no stdlib corpus."""
    parts = spec.split(":")
    if parts[0] != STDLIB:
        return None
    if len(parts) > 3:
        raise InputError(f"bad corpus name {spec!r}; use stdlib[:SUBSET[:SPLIT]], e.g. stdlib:code:train")
    subset = parts[1] if len(parts) > 1 and parts[1] else "all"
    split = parts[2] if len(parts) > 2 and parts[2] else "all"
    if subset not in STDLIB_SUBSETS or split not in STDLIB_SPLITS:
        raise InputError(f"bad corpus name {spec!r}: subset must be one of {', '.join(STDLIB_SUBSETS)} "
                         f"and split one of {', '.join(STDLIB_SPLITS)}, e.g. stdlib:tests:val")
    return subset, split


def _load(path: str, fmt: str, text_mode: str):
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    kwargs = {"sample_by": "document" if text_mode == "file" else "line"} if fmt == "text" else {}
    return datasets.load_dataset(fmt, data_files=[path], split="train", streaming=True, **kwargs)


class MissingField(InputError):
    """A row without the text field (or with null there); `--skip-missing-field` skips such rows."""


def _field(row, where: str, text_field: str) -> str:
    """The document text of one row; `where` names the file and the row's line (or row number)."""
    if not isinstance(row, dict):
        raise InputError(f"{where} holds a JSON {type(row).__name__}, not an object; one object per line, "
                         f"with the text in {text_field!r}")
    if row.get(text_field) is None:  # absent, or null (datasets fills absent fields with null)
        fields = ", ".join(sorted(k for k, v in row.items() if v is not None)) or "none"
        raise MissingField(f"{where} has no field {text_field!r} (fields: {fields}); pass --text-field NAME, "
                           "or --skip-missing-field to skip such rows")
    value = row[text_field]
    if not isinstance(value, str):
        raise InputError(f"{where}: field {text_field!r} holds {type(value).__name__}, not text; "
                         "pass the --text-field that holds the document text")
    return value


def _json_lines(path: str) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of every non-blank line: read here rather than through `datasets`
    so that an error names the file's real line."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{number} is not valid JSON ({e.msg} at column {e.colno}); "
                                 "fix or remove that line") from None
            except RecursionError:
                raise InputError(f"{path}:{number} nests JSON deeper than Python's parser goes; "
                                 "flatten or remove that line") from None
            yield number, value


def _first_invalid_utf8(path: str) -> tuple[int, str]:
    """The file offset and reason of the first byte sequence that is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous chunk
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                return offset - pending + e.start, e.reason
            offset += len(chunk)
    return offset, "truncated character at the end"


def _rows(path: str, fmt: str, text_mode: str) -> Iterator[tuple[str, object]]:
    """(where, row) for each row of a file: `where` is `path:LINE` for JSON lines, `path row N` else."""
    if Path(path).suffix.lower() in (".jsonl", ".ndjson"):
        for number, row in _json_lines(path):
            yield f"{path}:{number}", row
        return
    for i, row in enumerate(_load(path, fmt, text_mode)):
        yield (path if text_mode == "file" else f"{path}:{i + 1}") if fmt == "text" else f"{path} row {i + 1}", row


def _file_documents(path: str, text_field: str, text_mode: str, skip_missing=None) -> Iterator[Document]:
    """Documents of one file. `skip_missing`: a list that collects the rows skipped for lacking the
    text field (None: such a row is an error)."""
    fmt = file_format(path)
    try:
        for where, row in _rows(path, fmt, text_mode):
            if fmt == "text":
                yield Document(where, row["text"])
                continue
            try:
                yield Document(where, _field(row, where, text_field))
            except MissingField:
                if skip_missing is None:
                    raise
                skip_missing.append(where)
    except UnicodeDecodeError:
        at, reason = _first_invalid_utf8(path)
        raise InputError(f"{path} is not valid UTF-8 ({reason} at byte {at}); convert it, "
                         f"e.g. `iconv -f latin1 -t utf-8`") from None
    except InputError:
        raise
    except Exception as e:  # datasets/pyarrow parse errors come in many types; report them as input errors
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if fmt == "json":
            reason = _json_error(path) or reason
        raise InputError(f"cannot read {path} as {fmt}: {reason}; check the file's format") from None


def _json_error(path: str) -> str | None:
    """Where a JSON file stops being JSON, by the standard parser (datasets reports block offsets)."""
    try:
        json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        return f"{e.msg} at line {e.lineno}, column {e.colno}"
    except (OSError, UnicodeDecodeError, RecursionError):
        return None
    return None


@dataclass
class DocumentSource:
    """An iterable of documents over the inputs, validated up front."""

    inputs: list[str]
    text_field: str = "text"
    text_mode: str = "file"
    skip_missing_field: bool = False  # skip (and count) rows lacking the text field instead of failing
    val_percent: float = 5.0  # stdlib:...:train / :val: the share of files held out (data.val_percent)
    skipped: list = field(default_factory=list, init=False, repr=False)  # where each skipped row was
    _items: list = field(default_factory=list, init=False, repr=False)
    _description: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise InputError("no input given; pass --input PATH [PATH ...] or --input stdlib")
        if self.text_mode not in TEXT_MODES:
            raise InputError(f"unknown text mode {self.text_mode!r}; choose one of {', '.join(TEXT_MODES)}")
        if not 0 < self.val_percent < 50:
            raise InputError(f"the held-out share must be in (0, 50) percent, got {self.val_percent}; e.g. --val-percent 5")
        # 1. Resolve every input: a stdlib corpus name, or paths/globs that must match files.
        for spec in self.inputs:
            stdlib = parse_stdlib(spec)
            try:
                self._items += [("stdlib", stdlib)] if stdlib else [("file", f) for f in expand_inputs([spec])]
            except FileNotFoundError as e:
                raise InputError(str(e)) from None
        # 2. Read the first document of the first file of each format: bad formats and missing
        #    text fields fail here, before any heavy work.
        firsts = {file_format(v): v for kind, v in reversed(self._items) if kind == "file"}
        for path in firsts.values():
            next(_file_documents(path, self.text_field, self.text_mode, [] if self.skip_missing_field else None),
                 None)

    def __iter__(self) -> Iterator[Document]:
        for kind, value in self._items:
            if kind == "stdlib":
                yield from stdlib_documents(*value, self.val_percent)
            else:
                yield from _file_documents(value, self.text_field, self.text_mode,
                                           self.skipped if self.skip_missing_field else None)
        self.describe()

    def names(self) -> list[str]:
        """Each input file (or stdlib corpus) in the order the documents are read."""
        return [value if kind == "file" else ":".join((STDLIB, *value)) for kind, value in self._items]

    def split(self, files_per_shard: int) -> list["DocumentSource"]:
        """Contiguous slices of the inputs in the order they are read, ``files_per_shard`` each: the shards a
        staged pack tokenizes apart (data/staged.py). A stdlib corpus is one input."""
        if files_per_shard < 1:
            raise InputError(f"files per shard must be >= 1, got {files_per_shard}; e.g. --files-per-shard 1")
        shards = []
        for lo in range(0, len(self._items), files_per_shard):
            shard = copy.copy(self)
            items = [(kind, str(Path(v).resolve()) if kind == "file" else v)  # the same files from any folder
                     for kind, v in self._items[lo:lo + files_per_shard]]
            shard._items, shard.skipped, shard._description = items, [], {}
            shards.append(shard)
        return shards

    def describe(self) -> dict:
        """The inputs, for the packed data's metadata. The same dict object is returned each time, and
        its count of skipped rows is filled in as the documents are read (the packer writes the
        metadata once they all have been)."""
        held_out = {"val_percent": self.val_percent} if any(kind == "stdlib" for kind, _ in self._items) else {}
        self._description.update({"inputs": list(self.inputs), "files": sum(kind == "file" for kind, _ in self._items),
                                  "text_field": self.text_field, "text_mode": self.text_mode,
                                  "rows_missing_text_field": len(self.skipped), **held_out})
        return self._description
