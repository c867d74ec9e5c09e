"""Verify a packed dataset without trusting any of its files: what `tools/pack.py --verify` runs.

1. Structure (`data.format.check_index`, which opening a dataset runs too): each ``.idx`` header,
   its counts against its own size, the row lengths, every row pointer against the running sum of
   the lengths, the document index, and the ``.bin`` size the index implies.
2. Only when the structure holds: the rows themselves (document boundaries, padding, token range)
   and the metadata's accounting.

Every problem is one line that names the file; nothing raises on a damaged dataset.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data.format import FORMAT_VERSION, PackedDataset, check_index

_BLOCK = 4096  # rows checked at a time


def _meta(prefix: str) -> tuple[dict | None, list[str]]:
    path = Path(f"{prefix}.json")
    if not path.is_file():
        return None, [f"{path} is missing (the dataset is incomplete or not a packed dataset)"]
    try:
        meta = json.loads(path.read_text())
        seq_len, vocab, pad = int(meta["seq_len"]), int(meta["tokenizer"]["vocab_size"]), int(meta["tokenizer"]["pad"])
    except (ValueError, KeyError, TypeError) as e:
        return None, [f"{path} is not valid dataset metadata ({type(e).__name__}: {e})"]
    if meta.get("format_version") != FORMAT_VERSION:
        return None, [f"{path} has format_version {meta.get('format_version')}, keel reads {FORMAT_VERSION}"]
    if seq_len < 2 or vocab < 1 or not 0 <= pad < vocab:
        return None, [f"{path} has impossible values (seq_len {seq_len}, vocab_size {vocab}, pad {pad})"]
    return meta, []


def _check_bounds(prefix: str, flat: np.ndarray, lengths: np.ndarray, seq_len: int) -> list[str]:
    """Each boundary row: document starts from 0, strictly increasing, then a content end in [1, L]."""
    where = f"{prefix}.bounds.bin"
    ptr = np.concatenate([[0], np.cumsum(lengths)])
    firsts, ends = flat[ptr[:-1]], flat[ptr[1:] - 1]
    steps = np.diff(flat)
    steps[ptr[1:-1] - 1] = 1  # differences across two rows are not a row's own
    problems = []
    if (firsts != 0).any():
        problems.append(f"{where}: {int((firsts != 0).sum())} rows do not start with boundary 0")
    if (steps <= 0).any():
        problems.append(f"{where}: boundaries are not strictly increasing within some rows")
    if ((ends < 1) | (ends > seq_len)).any():
        problems.append(f"{where}: content end outside [1, {seq_len}] in some rows")
    return problems


def _check_tokens(prefix: str, ds: PackedDataset, ends: np.ndarray) -> list[str]:
    pad, vocab, problems = int(ds.meta["tokenizer"]["pad"]), ds.vocab_size, []
    for lo in range(0, len(ds), _BLOCK):
        hi = min(lo + _BLOCK, len(ds))
        rows = np.stack(ds.tokens[lo:hi])  # contiguous: every pointer was checked above
        padding = np.arange(ds.seq_len)[None, :] >= ends[lo:hi, None]
        if (rows[padding] != pad).any():
            problems.append(f"{prefix}.bin: rows {lo}..{hi - 1}: tokens after the content end are not the pad id {pad}")
        if rows.size and int(rows.max()) >= vocab:
            problems.append(f"{prefix}.bin: rows {lo}..{hi - 1}: token ids >= vocab_size {vocab}")
    return problems


def _check_accounting(prefix: str, meta: dict, rows: int, seq_len: int, padding: int) -> list[str]:
    s, problems = meta.get("stats", {}), []
    content = rows * seq_len - padding
    expect = {"rows": rows, "output_tokens": rows * seq_len, "padding_tokens": padding, "content_tokens": content}
    for key, value in expect.items():
        if s.get(key) != value or (key == "rows" and meta.get("rows") != value):
            problems.append(f"{prefix}.json: {key}={s.get(key)} but the files hold {value}")
    accounted = s.get("corpus_tokens", 0) + s.get("duplicated_tokens", 0) - s.get("truncated_tokens", 0)
    if accounted != content:
        problems.append(f"{prefix}.json: corpus {s.get('corpus_tokens')} + duplicated {s.get('duplicated_tokens')} - "
                        f"truncated {s.get('truncated_tokens')} = {accounted}, but the rows hold {content} content tokens")
    return problems


def verify_dataset(prefix: str | Path) -> list[str]:
    """Every problem found in a packed dataset, one line each naming the file (empty when consistent)."""
    from data.format import token_dtype

    prefix = str(prefix)
    meta, problems = _meta(prefix)
    if meta is None:
        return problems
    # 1. structure of both indexed pairs, independently of megatron's reader
    token_problems, token_lengths = check_index(prefix, token_dtype(int(meta["tokenizer"]["vocab_size"])),
                                               int(meta["seq_len"]))
    bound_problems, bound_lengths = check_index(f"{prefix}.bounds", np.int32, None)
    problems = token_problems + bound_problems
    if not problems and len(token_lengths) != len(bound_lengths):
        problems.append(f"{prefix}.idx has {len(token_lengths)} rows, {prefix}.bounds.idx {len(bound_lengths)}")
    if problems:
        return problems
    # 2. the rows and the accounting, now that every pointer is known to be right
    flat = np.fromfile(f"{prefix}.bounds.bin", dtype=np.int32).astype(np.int64)
    problems = _check_bounds(prefix, flat, bound_lengths, int(meta["seq_len"]))
    if problems:
        return problems
    ends = flat[np.cumsum(bound_lengths) - 1]
    ds = PackedDataset(prefix)
    problems += _check_tokens(prefix, ds, ends)
    problems += _check_accounting(prefix, meta, len(ds), ds.seq_len, int((ds.seq_len - ends).sum()))
    return problems
