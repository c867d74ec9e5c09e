"""Packed-dataset verification: every kind of damage to every file is one line naming the file."""

import json
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from data.verify import verify_dataset
from tests.helpers import ROOT

SUFFIXES = (".bin", ".idx", ".bounds.bin", ".bounds.idx", ".json")


def _copy(prefix, tmp_path):
    for s in SUFFIXES:
        shutil.copy(f"{prefix}{s}", f"{tmp_path / 'ds'}{s}")
    return tmp_path / "ds"


def _edit(path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


HEADER = 34  # megatron's index header: magic 9, version 8, dtype 1, rows 8, documents 8


def damage_cases(ds) -> dict:
    """Each case of CASES: (what damages the copy at `ds`, a phrase its report must contain)."""
    idx, bounds_idx = ds.with_name("ds.idx"), ds.with_name("ds.bounds.idx")
    rows = struct.unpack_from("<Q", idx.read_bytes(), 18)[0]
    pointer_of_row_5 = HEADER + 4 * rows + 8 * 5
    return {
        "a row pointer moved by one token": (lambda: _edit(idx, pointer_of_row_5, struct.pack("<q", 2 + struct.unpack_from(
            "<q", idx.read_bytes(), pointer_of_row_5)[0])), "ds.idx: 1 row pointers"),
        "the header's magic": (lambda: _edit(idx, 0, b"XXXX"), "ds.idx does not start with"),
        "the index version": (lambda: _edit(idx, 9, struct.pack("<Q", 7)), "ds.idx has index version 7"),
        "the dtype code": (lambda: _edit(idx, 17, b"\x05"), "ds.idx stores dtype code 5"),
        "the row count": (lambda: _edit(idx, 18, struct.pack("<Q", rows + 1)), "ds.idx is"),
        "a truncated index": (lambda: idx.write_bytes(idx.read_bytes()[:20]), "shorter than its 34-byte header"),
        "a truncated bin": (lambda: ds.with_name("ds.bin").write_bytes(ds.with_name("ds.bin").read_bytes()[:-6]),
                            "ds.bin is"),
        "a row length": (lambda: _edit(idx, HEADER + 4 * 3, struct.pack("<i", 63)), "rows do not hold exactly 64"),
        "a truncated bounds index": (lambda: bounds_idx.write_bytes(bounds_idx.read_bytes()[:-3]), "ds.bounds.idx is"),
        "a token id past the vocabulary": (lambda: _edit(ds.with_name("ds.bin"), 10, b"\xff\xff"), "token ids >= vocab"),
        "a boundary out of order": (lambda: _edit(ds.with_name("ds.bounds.bin"), 0, struct.pack("<i", 7)),
                                    "do not start with boundary 0"),
        "the metadata": (lambda: ds.with_name("ds.json").write_text("{not json"), "ds.json is not valid"),
        "a missing bounds file": (lambda: ds.with_name("ds.bounds.bin").unlink(), "ds.bounds.bin is missing"),
    }


CASES = ["a row pointer moved by one token", "the header's magic", "the index version", "the dtype code",
         "the row count", "a truncated index", "a truncated bin", "a row length", "a truncated bounds index",
         "a token id past the vocabulary", "a boundary out of order", "the metadata", "a missing bounds file"]


@pytest.mark.parametrize("case", CASES)
def test_each_damage_is_found_and_named(packed_sp, tmp_path, case):
    ds = _copy(packed_sp, tmp_path)
    assert verify_dataset(ds) == []
    damage, expected = damage_cases(ds)[case]
    damage()
    problems = verify_dataset(ds)
    assert problems and any(expected in p for p in problems), problems
    assert all("\n" not in p and str(tmp_path) in p for p in problems)


def test_the_cli_reports_lines_and_never_a_traceback(packed_sp, tmp_path):
    ds = _copy(packed_sp, tmp_path)
    damage_cases(ds)["a row pointer moved by one token"][0]()
    proc = subprocess.run([sys.executable, "tools/pack.py", "--verify", str(ds), str(packed_sp)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stdout.splitlines() == [f"{ds}: FAILED", f"{packed_sp}: OK"]
    assert all(line.startswith("pack.py: verify: ") for line in proc.stderr.strip().splitlines())
