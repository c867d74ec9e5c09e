"""tools/gpu_check.sh: sections are named and time-boxed within the budget a lent GPU allows."""

import re
import subprocess

from tests.helpers import ROOT

SCRIPT = ROOT / "tools" / "gpu_check.sh"


def _sections() -> dict[str, list[int]]:
    """Each section's step timeouts, read from the script."""
    text = SCRIPT.read_text()
    bodies = re.findall(r"^section_(\w+)\(\) \{\n(.*?)^\}", text, flags=re.S | re.M)
    return {name: [int(t) for t in re.findall(r"^\s*step (\d+) ", body, flags=re.M)] for name, body in bodies}


def _setting(name: str) -> int:
    return int(re.search(rf"^{name}=(\d+)", SCRIPT.read_text(), flags=re.M).group(1))


def test_each_section_fits_its_budget():
    budget, triage, install, grace = (_setting(n) for n in ("SECTION_BUDGET", "TRIAGE_BUDGET", "INSTALL_BUDGET",
                                                              "KILL_GRACE"))
    sections = _sections()
    assert set(sections) >= {"triage", "10", "20", "30", "40"}
    for name, timeouts in sections.items():
        assert timeouts, f"section {name} has no time-boxed step"
        # each step may run its limit plus the grace between SIGINT and SIGKILL
        assert sum(timeouts) + grace * len(timeouts) <= (triage if name == "triage" else budget), (name, timeouts)
    # with the install and about two minutes for the machine's start, a section stays under 8 minutes and
    # the triage under 9 (of the 15 a lent GPU gives, so that it can run again once)
    assert budget + install + grace + 120 <= 8 * 60
    assert triage + install + grace <= 9 * 60


def test_sections_that_start_many_runs_at_once_do_not_compile_them():
    """16-18 concurrent runs each compiling with inductor's min(32, cores) workers would spend a section's
    time box on compilation; their models are too small to gain from it."""
    text = SCRIPT.read_text()
    bodies = dict(re.findall(r"^section_(\w+)\(\) \{\n(.*?)^\}", text, flags=re.S | re.M))
    concurrent = [name for name, body in bodies.items() if "--concurrent" in body or "--jobs" in body or " &\n" in body]
    assert set(concurrent) >= {"41", "42", "43", "44", "45", "46"}
    for name in concurrent:
        assert "trainer.compile=false" in bodies[name], name


def test_unknown_section_is_one_line_and_nothing_runs():
    proc = subprocess.run(["bash", str(SCRIPT), "99"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "no section 99" in proc.stderr
    listing = subprocess.run(["bash", str(SCRIPT), "--list"], capture_output=True, text=True)
    assert listing.returncode == 0 and "10 20 21 22 30 40" in listing.stdout and "triage" in listing.stdout


def test_triage_report_collects_what_each_step_left(tmp_path, capsys):
    """The triage's page says what ran, what failed and what is missing (a step cut off by its limit)."""
    import json

    from tools import triage_report

    d = tmp_path / "triage"
    d.mkdir()
    (d / "versions.json").write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0",
                                                 "git_revision": "abc"}))
    (d / "steps.jsonl").write_text('{"step": "pytest", "limit_s": 130, "rc": 124, "seconds": 135}\n')
    (d / "tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1" time="12.5">'
        '<testcase classname="tests.models.test_decode" name="test_a"/>'
        '<testcase classname="tests.models.test_decode" name="test_b"><failure message="boom"/></testcase>'
        '<testcase classname="tests.models.test_decode" name="test_c"><skipped/></testcase></testsuite></testsuites>')
    row = {"attention": "gqa", "batch": 32, "context": 16384, "tokens_per_s": 1000.0, "hbm_share": 0.61,
           "ratio_to_gqa": 1.0, "attention_kernel": "triton"}
    (d / "decode.json").write_text(json.dumps([row, row | {"attention": "mla", "tokens_per_s": None}]))
    keel = {"ms": 357.3, "tokens_per_s": 91700, "mfu": 0.495, "peak_bytes": 2**34}
    (d / "step.json").write_text(json.dumps({"preset": "755M", "dtype": "torch.bfloat16", "ratio_keel_to_compiled": 1.19,
                                            "steps": {"keel": keel}}))
    assert triage_report.main([str(tmp_path)]) == 0
    collected = json.loads((tmp_path / "triage.json").read_text())
    assert collected["tests"]["failed"] == ["tests.models.test_decode::test_b"] and collected["tests"]["passed"] == 1
    assert collected["profile"] is None and collected["decode_sdpa"] is None
    page = (tmp_path / "triage.md").read_text()
    assert "Triage on NVIDIA H100 80GB HBM3" in page and "| `pytest` | 130 | 135 | 124 |" in page
    assert "1 passed, 1 failed, 1 skipped" in page and "failed: `tests.models.test_decode::test_b`" in page
    assert "| gqa | 32 | 16384 | 1,000 | 61% | 1.00x | triton |" in page
    assert "| mla | 32 | 16384 | out of memory" in page
    assert "keel / compiled plain time ratio 1.190" in page and "| keel | 357.3 | 91,700 | 49.5% | 16.0 |" in page
    assert page.rstrip().endswith("not measured")  # the profile step left nothing
    assert triage_report.main([str(tmp_path / "nowhere")]) == 2 and capsys.readouterr().err.count("\n") == 1
