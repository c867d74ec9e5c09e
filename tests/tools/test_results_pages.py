"""docs/results/: every page opens with a verdict, every results JSON says where it came from."""

import json
import re

import pytest

from tests.helpers import ROOT

RESULTS = ROOT / "docs" / "results"
VERDICT = re.compile(r"^> \*\*Verdict: (reproduced|partly reproduced|not reproduced|inconclusive)\.\*\* \S")
PAGES = sorted(RESULTS.glob("*.md"))
JSONS = sorted(p for p in RESULTS.rglob("*.json") if "archive" not in p.relative_to(RESULTS).parts)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_results_page_opens_with_a_verdict_and_its_reason(page):
    assert VERDICT.match(page.read_text().splitlines()[0]), f"{page} must open with '> **Verdict: ...** why'"


@pytest.mark.parametrize("path", JSONS, ids=lambda p: str(p.relative_to(RESULTS)))
def test_every_results_json_records_its_provenance(path):
    prov = json.loads(path.read_text())["provenance"]
    assert prov["git_revision"] not in ("", "unknown") and prov["commands"] and prov["device"] and prov["dtype"]
    assert {"torch", "megatron_core"} <= set(prov["versions"])


def test_the_readme_technique_table_shows_each_pages_verdict():
    readme = (ROOT / "README.md").read_text()
    for page in PAGES:
        verdict = VERDICT.match(page.read_text().splitlines()[0]).group(1)
        row = next((line for line in readme.splitlines() if f"docs/results/{page.name}" in line and line.startswith("|")),
                   None)
        assert row is not None and verdict in row, f"README's technique table lacks {page.name}'s verdict {verdict!r}"
