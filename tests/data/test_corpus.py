"""The stdlib corpus cut at definitions: documents mostly shorter than a row, nothing dropped."""

from data.corpus import Document, definitions, stdlib_documents

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
