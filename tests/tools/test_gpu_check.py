"""tools/gpu_check.sh: sections are named and time-boxed within the budget a lent GPU allows."""

import re
import subprocess

from tests.helpers import ROOT

SCRIPT = ROOT / "tools" / "gpu_check.sh"


def _sections() -> dict[str, list[int]]:
    """Each section's step timeouts, read from the script."""
    text = SCRIPT.read_text()
    bodies = re.findall(r"^section_(\d+)\(\) \{\n(.*?)^\}", text, flags=re.S | re.M)
    return {name: [int(t) for t in re.findall(r"^\s*step (\d+) ", body, flags=re.M)] for name, body in bodies}


def test_each_section_fits_its_budget():
    text = SCRIPT.read_text()
    budget = int(re.search(r"^SECTION_BUDGET=(\d+)", text, flags=re.M).group(1))
    install = int(re.search(r"^INSTALL_BUDGET=(\d+)", text, flags=re.M).group(1))
    sections = _sections()
    assert set(sections) >= {"10", "20", "30", "40"}
    for name, timeouts in sections.items():
        assert timeouts, f"section {name} has no time-boxed step"
        assert sum(timeouts) <= budget, (name, timeouts)
    # with the install and about two minutes for the machine's start, a section stays under 8 minutes
    assert budget + install + 120 <= 8 * 60


def test_unknown_section_is_one_line_and_nothing_runs():
    proc = subprocess.run(["bash", str(SCRIPT), "99"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "no section 99" in proc.stderr
    listing = subprocess.run(["bash", str(SCRIPT), "--list"], capture_output=True, text=True)
    assert listing.returncode == 0 and "10 20 21 22 30 40" in listing.stdout
