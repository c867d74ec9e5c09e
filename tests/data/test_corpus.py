"""The stdlib corpus: cut at definitions (documents mostly shorter than a row, nothing dropped), and its prose
(docstrings, help topics) apart from its code."""

import ast

from data.corpus import Document, definitions, docstrings, is_validation, stdlib_documents, without_docstrings

MODULE = '''import os

X = 1


@decorator
def top(a):
    return a


class Case:
    attr = 2

    def test_one(self):
        pass

    async def test_two(self):
        pass
'''


def test_definitions_cut_functions_and_methods_and_keep_every_character():
    pieces = definitions(Document("m.py", MODULE))
    texts = [p.text for p in pieces]
    assert "".join(texts) == MODULE
    assert [p.name for p in pieces] == [f"m.py#{k}" for k in range(len(pieces))]
    assert texts[0].startswith("import os") and "X = 1" in texts[0]
    assert texts[1].startswith("@decorator\ndef top") and "class" not in texts[1]
    assert texts[2].lstrip().startswith("class Case:") and "def" not in texts[2]
    assert texts[3].lstrip().startswith("def test_one") and texts[4].lstrip().startswith("async def test_two")


def test_a_file_that_does_not_parse_stays_whole():
    doc = Document("bad.py", "def broken(:\n    pass\n")
    assert definitions(doc) == [doc]


def test_defs_subsets_split_by_file_like_their_whole_file_subsets():
    whole = {d.name for d in stdlib_documents("tests", "val")}
    defs = list(stdlib_documents("tests-defs", "val"))
    assert {d.name.split("#")[0] for d in defs} == whole and len(defs) > 3 * len(whole)


DOCUMENTED = '''"""Module doc."""
import os  # a comment stays


class Box:
    """A box.

        Indented detail.
    """

    def only_doc(self):
        """Nothing else here."""

    async def more(self):
        """Then code."""  # trailing comment
        return "not a docstring"


def plain():
    x = """a string, not a docstring"""
    return x
'''


def test_code_nodoc_loses_every_docstring_and_keeps_the_code_and_prose_keeps_them():
    bare = without_docstrings(DOCUMENTED)
    tree = ast.parse(bare)  # still Python: a body that held only a docstring holds `pass`
    assert docstrings(bare) == [] and "Module doc" not in bare and "A box" not in bare
    assert "    def only_doc(self):\n        pass\n" in bare
    assert "import os  # a comment stays" in bare and 'return "not a docstring"' in bare
    assert 'x = """a string, not a docstring"""' in bare
    assert len([n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]) == 3
    assert docstrings(DOCUMENTED) == ["Module doc.", "A box.\n\nIndented detail.", "Nothing else here.",
                                      "Then code."]
    assert docstrings("def broken(:\n") == [] and without_docstrings("def broken(:\n") == "def broken(:\n"


def test_prose_and_code_nodoc_split_a_module_alike_and_help_topics_by_topic(monkeypatch):
    import pydoc_data.topics

    import data.corpus as corpus

    files = corpus.stdlib_files("code")
    root = corpus.stdlib_root()
    # a few modules (and two topics) keep this cheap; the split rule is the one every subset uses
    chosen = [p for p in files if str(p.relative_to(root)) in ("json/__init__.py", "textwrap.py", "this.py")]
    chosen += [p for p in files if p.relative_to(root).as_posix() == corpus.HELP_TOPICS]
    monkeypatch.setattr(corpus, "stdlib_files", lambda subset="all": chosen)
    monkeypatch.setattr(pydoc_data.topics, "topics", {"assert": "The assert statement.", "if": "The if statement."})
    val = 50.0  # about half of the names held out
    prose = {split: {d.name: d.text for d in stdlib_documents("prose", split, val)} for split in ("train", "val")}
    code = {split: {d.name for d in stdlib_documents("code-nodoc", split, val)} for split in ("train", "val")}
    assert not prose["train"].keys() & prose["val"].keys() and not code["train"] & code["val"]
    every = prose["train"] | prose["val"]
    # this.py has no docstring: no prose document; the help topics are prose only, one document each
    assert set(every) == {"json/__init__.py", "textwrap.py", "pydoc_data/topics.py#assert", "pydoc_data/topics.py#if"}
    assert code["train"] | code["val"] == {"json/__init__.py", "textwrap.py", "this.py"}
    for split in ("train", "val"):  # a module's docstrings are on the side of its code
        assert {n for n in prose[split] if "#" not in n} == code[split] - {"this.py"}
        assert all(is_validation(n, val) == (split == "val") for n in prose[split])
    assert every["pydoc_data/topics.py#if"] == "The if statement."
    assert every["textwrap.py"].startswith("Text wrapping and filling.") and "def " not in every["textwrap.py"]
    assert list(stdlib_documents("prose", "all", val)) == list(stdlib_documents("prose", "all", val))  # same order
