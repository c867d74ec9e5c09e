"""Corpus sources: the default corpus (the Python standard library) and local files via `datasets`."""

from __future__ import annotations

import ast
import glob
import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from data.errors import DataError, DataNotFound

STDLIB = "stdlib"  # the named default corpus: one document per standard-library source file
# code / tests: the two domains of the continual-pretraining experiment; "-defs": the same files cut at
# their definitions (see `definitions`), documents mostly shorter than a 256-token row
STDLIB_SUBSETS = ("all", "code", "tests", "code-defs", "tests-defs")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(subset: str = "all") -> list[Path]:
    """Standard-library ``.py`` files in a stable order.

    ``subset``: ``all``; ``code`` (everything outside ``test/`` directories), or ``tests`` (only
    ``test/`` and ``tests/`` directories), the two domains of the continual-pretraining experiment.
    """
    subset = subset.removesuffix("-defs")
    if subset not in ("all", "code", "tests"):
        raise DataError(f"unknown stdlib subset {subset!r}; choose one of {', '.join(STDLIB_SUBSETS)}")
    root = stdlib_root()
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).parts
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        is_test = "test" in rel[:-1] or "tests" in rel[:-1]
        if subset == "all" or (subset == "tests") == is_test:
            files.append(p)
    return files


def is_validation(name: str, val_percent: float) -> bool:
    """Deterministic split by file name: the same file lands on the same side on every machine."""
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return (h % 10_000) < val_percent * 100


@dataclass
class Document:
    name: str
    text: str


def read_text_file(path: Path) -> str:
    # Non-UTF-8 bytes are replaced rather than failing the whole corpus; the replacement
    # character tokenizes like any other rare symbol.
    return path.read_bytes().decode("utf-8", errors="replace")


def stdlib_documents(subset: str = "all", split: str = "all", val_percent: float = 5.0) -> Iterator[Document]:
    root = stdlib_root()
    for p in stdlib_files(subset):
        name = str(p.relative_to(root))
        if split != "all" and is_validation(name, val_percent) != (split == "val"):
            continue  # split by file: a file's definitions all land on the same side
        doc = Document(name, read_text_file(p))
        yield from definitions(doc) if subset.endswith("-defs") else [doc]


def definitions(doc: Document) -> list[Document]:
    """A module cut before and after each top-level function and class method (decorators included);
    what lies between them (imports, constants, a class's header and attributes) is a document too.
    A file that does not parse stays whole. Named ``FILE#K``. Concatenated, the pieces are the file."""
    try:
        tree = ast.parse(doc.text)
    except (SyntaxError, ValueError):
        return [doc]
    funcs = (ast.FunctionDef, ast.AsyncFunctionDef)
    members = [m for n in tree.body for m in ([n] if isinstance(n, funcs) else
                                                n.body if isinstance(n, ast.ClassDef) else []) if isinstance(m, funcs)]
    cuts = {line for m in members for line in (min([d.lineno for d in m.decorator_list] + [m.lineno]), m.end_lineno + 1)}
    lines = doc.text.splitlines(keepends=True)
    bounds = sorted({1, len(lines) + 1} | {c for c in cuts if 1 < c <= len(lines)})
    pieces = ["".join(lines[a - 1:b - 1]) for a, b in zip(bounds, bounds[1:])]
    # whitespace-only stretches join the next piece, so no text is dropped
    out, carry = [], ""
    for piece in pieces:
        carry += piece
        if carry.strip():
            out.append(carry)
            carry = ""
    if carry and out:
        out[-1] += carry
    return [Document(f"{doc.name}#{k}", text) for k, text in enumerate(out)] or [doc]


def expand_inputs(patterns: list[str]) -> list[str]:
    """Expand globs; every pattern must match at least one file."""
    files: list[str] = []
    for pat in patterns:
        hits = sorted(glob.glob(pat, recursive=True)) if glob.has_magic(pat) else ([pat] if Path(pat).exists() else [])
        hits = [h for h in hits if Path(h).is_file()]
        if not hits:
            raise DataNotFound(f"input {pat!r} matches no file; check the path or quote the glob")
        files.extend(hits)
    return files
