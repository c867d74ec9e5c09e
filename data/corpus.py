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
# their definitions (see `definitions`), documents mostly shorter than a 256-token row; prose: English text
# (the modules' docstrings and the help() topics, `prose_documents`) and code-nodoc: the modules without
# their docstrings (`without_docstrings`), two sources that differ in kind (the MoE experiment's)
STDLIB_SUBSETS = ("all", "code", "tests", "code-defs", "tests-defs", "code-nodoc", "prose")
HELP_TOPICS = "pydoc_data/topics.py"  # help()'s topics, a dict of English prose: stdlib:prose's, not code-nodoc's
DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)  # what may hold a docstring


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(subset: str = "all") -> list[Path]:
    """Standard-library ``.py`` files in a stable order.

    ``subset``: ``all``; ``code`` (everything outside ``test/`` directories), or ``tests`` (only
    ``test/`` and ``tests/`` directories), the two domains of the continual-pretraining experiment.
    The derived subsets read their base's files: ``-defs`` and ``-nodoc`` theirs, ``prose`` code's.
    """
    subset = "code" if subset == "prose" else subset.removesuffix("-defs").removesuffix("-nodoc")
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
    if subset == "prose":
        yield from prose_documents(split, val_percent)
        return
    root = stdlib_root()
    for p in stdlib_files(subset):
        name = str(p.relative_to(root))
        if split != "all" and is_validation(name, val_percent) != (split == "val"):
            continue  # split by file: a file's definitions all land on the same side
        if subset == "code-nodoc":
            if Path(name).as_posix() != HELP_TOPICS:
                yield Document(name, without_docstrings(read_text_file(p)))
            continue
        doc = Document(name, read_text_file(p))
        yield from definitions(doc) if subset.endswith("-defs") else [doc]


def prose_documents(split: str = "all", val_percent: float = 5.0) -> Iterator[Document]:
    """stdlib:prose: English text. One document per module of stdlib:code, its docstrings (module, classes,
    functions; indentation cleaned) joined by blank lines, split by the module's name like every file of
    the corpus, so a module's docstrings land on the side its code-nodoc text does; then one per help()
    topic of pydoc_data.topics, named ``pydoc_data/topics.py#TOPIC`` and split by that name."""
    root = stdlib_root()
    def held_out(name: str) -> bool:  # on the side `split` asks for
        return split == "all" or is_validation(name, val_percent) == (split == "val")

    for p in stdlib_files("code"):
        name = str(p.relative_to(root))
        if Path(name).as_posix() != HELP_TOPICS and held_out(name):
            if text := "\n\n".join(docstrings(read_text_file(p))):
                yield Document(name, text)
    from pydoc_data.topics import topics

    for topic in sorted(topics):
        if held_out(name := f"{HELP_TOPICS}#{topic}"):
            yield Document(name, topics[topic])


def _docstring_statements(tree: ast.AST) -> list[tuple[ast.AST, ast.Expr]]:
    """(owner, statement) of every docstring: a string literal as the first statement of the module, a
    class or a function (what ``ast.get_docstring`` reads)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, DOCUMENTED) and node.body and isinstance(first := node.body[0], ast.Expr) \
                and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            out.append((node, first))
    return out


def docstrings(source: str) -> list[str]:
    """The docstrings of a module's source, in ``ast.walk`` order (module first), each cleaned like
    ``inspect.cleandoc``; none from a file that does not parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    return [text for owner, _ in _docstring_statements(tree) if (text := ast.get_docstring(owner, clean=True))]


def without_docstrings(source: str) -> str:
    """The source with its docstrings' lines cut out, so code and prose are apart (stdlib:code-nodoc).
    A body that held only a docstring gets ``pass`` in its place, so the module still parses. A docstring
    sharing a line with other code (``'''x'''; y = 1``, rare) stays; a file that does not parse stays whole.
    Comments stay: they are part of the code's text."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return source
    lines = source.splitlines(keepends=True)
    for owner, stmt in sorted(_docstring_statements(tree), key=lambda s: -s[1].lineno):
        first, last = lines[stmt.lineno - 1], lines[stmt.end_lineno - 1]
        before = first.encode()[:stmt.col_offset].decode(errors="replace")  # ast's columns count UTF-8 bytes
        after = last.encode()[stmt.end_col_offset:].decode(errors="replace")
        if before.strip() or after.strip() and not after.strip().startswith("#"):
            continue
        keep = [f"{before}pass\n"] if len(owner.body) == 1 else []
        lines[stmt.lineno - 1:stmt.end_lineno] = keep
    return "".join(lines)


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
