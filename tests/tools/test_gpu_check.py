"""tools/gpu_check.py (run as tools/gpu_check.sh) and the sections of tools/gpu_sections.py: sections are named
and time-boxed within the budget a lent GPU allows, and a step past its limit is interrupted, then killed."""

import importlib
import json
import signal
import subprocess
import tarfile
from pathlib import Path

from tests.helpers import ROOT
from tools import gpu_check, gpu_sections

SCRIPT = ROOT / "tools" / "gpu_check.sh"
LONG = {**dict.fromkeys(("47", "48", "49"), "attention"),  # issue 38's long designs: section -> driver
        **dict.fromkeys(("50", "51", "52", "53", "54"), "warmup_free")}


def _sections(**env) -> dict[str, gpu_sections.Section]:
    """Each section's table as a call with these settings would run it (no query runs)."""
    return {name: section(gpu_sections.Check(env, dry=True)) for name, section in gpu_sections.SECTIONS.items()}


def _stages(argv: tuple[str, ...]) -> tuple[str, ...]:
    """The stages a driver call's --stage names."""
    after = argv[argv.index("--stage") + 1:]
    return after[:next((i for i, a in enumerate(after) if a.startswith("-")), len(after))]


def test_each_section_fits_its_budget():
    sections, grace = _sections(), gpu_check.KILL_GRACE
    assert set(sections) >= {"triage", "10", "20", "30", "40", *LONG}
    for name, section in sections.items():
        limits = [step.limit_s for step in section.steps]
        assert limits, f"section {name} has no time-boxed step"
        # each step may run its limit plus the grace between SIGINT and SIGKILL
        assert sum(limits) + grace * len(limits) <= gpu_check.budget(name), (name, limits)
    # with the install and about two minutes for the machine's start, a section stays under 8 minutes and
    # the triage under 9 (of the 15 a lent GPU gives, so that it can run again once)
    assert gpu_check.SECTION_BUDGET + gpu_check.INSTALL_BUDGET + grace + 120 <= 8 * 60
    assert gpu_check.TRIAGE_BUDGET + gpu_check.INSTALL_BUDGET + grace <= 9 * 60


def test_sections_that_start_many_runs_at_once_do_not_compile_them():
    """16-18 concurrent runs each compiling with inductor's min(32, cores) workers would spend a section's
    time box on compilation; their models are too small to gain from it."""
    concurrent = {name: [s.argv for s in section.steps if "--concurrent" in s.argv or "--jobs" in s.argv]
                  for name, section in _sections().items()}
    concurrent = {name: argvs for name, argvs in concurrent.items() if argvs}
    assert set(concurrent) >= {"41", "42", "43", "44", "45", "46", *LONG}
    for name, argvs in concurrent.items():
        assert all("trainer.compile=false" in argv for argv in argvs), name


def test_the_knobs_shrink_a_claim_section_and_rehearsal_takes_cpu_shapes(tmp_path):
    wf = _sections(WF_LRS="1e-2", WF_SEEDS="1", WF_STEPS="4", WF_JOBS="2", PRECISION="fp32")["41"].steps[0].argv
    assert ("--lrs", "1e-2", "--seeds", "1") == wf[wf.index("--lrs"):wf.index("--lrs") + 4]
    assert {"trainer.max_steps=4", "trainer.precision=fp32", "--concurrent"} <= set(wf)
    assert wf[wf.index("--jobs") + 1] == "2"
    triage = _sections(REHEARSAL="1", OUT=str(tmp_path))["triage"]
    assert all("cuda" not in step.argv for step in triage.steps)
    assert triage.steps_log == tmp_path / "triage" / "steps.jsonl"


def test_every_step_calls_something_that_exists():
    """A step's script, test files, helper and driver stages exist (a renamed one would only fail on a GPU)."""
    from tools.experiments import cpt_experiment

    for name, section in _sections().items():
        for step in section.steps:
            argv = step.argv
            if argv[:2] == ("-m", "pytest"):
                assert all((ROOT / a).is_file() for a in argv if a.startswith("tests/")), (name, step.name)
            elif argv[:2] == ("-m", "tools.gpu_check"):
                assert argv[2] in gpu_check.HELPERS, (name, step.name)
            else:
                assert (ROOT / argv[0]).is_file(), (name, step.name)
            if argv[0].startswith("tools/experiments/") and "--stage" in argv:
                driver = importlib.import_module(f"tools.experiments.{Path(argv[0]).stem}")
                choices = (*driver.STAGES, *(("continual",) if driver is cpt_experiment else ()))
                stages = _stages(argv)
                assert stages and set(stages) <= set(choices), (name, step.name, stages)


def test_the_long_design_sections_run_the_registered_design_and_report_apart_from_the_cpu(monkeypatch, capsys):
    """Sections 47-54 split issue 38's long designs: every driver call names --design long (without it a driver
    runs the first design, into other folders), every stage is run, and the last part of each reports once,
    into $OUT under a name other than the one the CPU's report of the design takes (its --dry-run says which)."""
    from tools.experiments import attention_experiment, warmup_free_experiment

    monkeypatch.chdir(ROOT)  # a driver's main runs from the repository root
    sections = _sections(OUT="/gpu-out")
    for driver, module in (("attention", attention_experiment), ("warmup_free", warmup_free_experiment)):
        parts = [sections[name] for name, d in sorted(LONG.items()) if d == driver]
        calls = [s.argv for part in parts for s in part.steps if s.argv[0].endswith(f"{driver}_experiment.py")]
        assert calls and all(argv[argv.index("--design") + 1] == "long" for argv in calls), driver
        stages = [stage for argv in calls for stage in _stages(argv)]
        assert set(stages) == set(module.STAGES) and stages[-1] == "report", (driver, stages)
        reports = [argv for argv in calls if "report" in argv]
        assert len(reports) == 1 and reports[0] == parts[-1].steps[-1].argv, driver
        assert module.main(["--design", "long", "--stage", "report", "--dry-run"]) == 0
        cpu = capsys.readouterr().out.split()
        gpu = reports[0][reports[0].index("--name") + 1]
        assert gpu.endswith("_gpu") and gpu != cpu[cpu.index("--name") + 1], (gpu, cpu)
        assert reports[0][reports[0].index("--out") + 1] == "/gpu-out"


def test_the_moe_section_scores_what_its_prose_source_holds(monkeypatch):
    """Section 44 asks for at most MOE_VAL_TOKENS (what prose's held-out side allows), however many VAL_TOKENS a
    call sets; a CPU trial's fewer still win, and the other sections take VAL_TOKENS as set."""
    asked = []

    def query(argv, **kwargs):
        asked.append(int(argv[argv.index("--validation") + 1]))
        return subprocess.CompletedProcess(argv, 0, "data.val_percent=30 trainer.eval_batches=2\n", "")

    monkeypatch.setattr(gpu_sections.subprocess, "run", query)
    gpu_sections.section_44(gpu_sections.Check({}))
    gpu_sections.section_44(gpu_sections.Check({"VAL_TOKENS": "4096"}))
    gpu_sections.section_45(gpu_sections.Check({"VAL_TOKENS": str(2 * gpu_sections.VAL_TOKENS)}))
    assert asked == [gpu_sections.MOE_VAL_TOKENS] * 2 + [4096] * 2 + [2 * gpu_sections.VAL_TOKENS]
    assert gpu_sections.MOE_VAL_TOKENS < gpu_sections.VAL_TOKENS


def test_validation_holds_at_least_val_tokens_scored_once():
    line = gpu_check.validation_overrides(1_000_000, "15", 1.0, ["+experiment=width_sweep", "trainer.max_steps=7"])
    overrides = dict(o.split("=") for o in line.split())
    from pretrain.config import compose_config

    cfg = compose_config(["+experiment=width_sweep"])
    row, batches = cfg.trainer.global_batch_size * cfg.data.seq_len, int(overrides["trainer.eval_batches"])
    assert batches * row >= 1_000_000 > (batches - 1) * row
    assert overrides["data.val_percent"] == "15" and overrides["trainer.eval_interval"] == "7"


def test_unknown_section_or_setting_is_one_line_and_nothing_runs(tmp_path, monkeypatch, capsys):
    proc = subprocess.run(["bash", str(SCRIPT), "99"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "no section 99" in proc.stderr
    assert proc.stdout == ""  # no install, no step
    listing = subprocess.run(["bash", str(SCRIPT), "--list"], capture_output=True, text=True)
    assert listing.returncode == 0 and "10 20 21 22 30 40" in listing.stdout and "triage" in listing.stdout
    assert "41. warmup-free in bf16" in listing.stdout
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    monkeypatch.setenv("VAL_TOKENS", "1M")
    assert gpu_check.main(["41"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "VAL_TOKENS=1M is not a whole number" in err and not (tmp_path / "out").exists()
    assert gpu_check.main(["--help"]) == 0
    assert "REHEARSAL=1" in capsys.readouterr().out


def test_a_call_runs_its_sections_steps_and_keeps_their_runs(tmp_path, monkeypatch, capsys):
    """main: a section's old runs removed first, its steps in order into the steps log, its files copied and its run
    folders archived without checkpoints, all printed into OUT/gpu_check.log; a section without its validation
    overrides is skipped in one line, and the next one still runs."""
    runs, out = tmp_path / "runs", tmp_path / "out"
    (runs / "old").mkdir(parents=True)
    run = runs / "arm-1"
    monkeypatch.setattr(gpu_check, "install", lambda c: None)  # no wheels to install, no keel to ask for versions
    monkeypatch.setenv("PY", "bash")
    monkeypatch.setenv("OUT", str(out))
    monkeypatch.delenv("STEPS_LOG", raising=False)

    def section(c: gpu_sections.Check) -> gpu_sections.Section:
        train = f"mkdir -p {run}/checkpoints && echo w > {run}/checkpoints/w && echo 4.2 > {run}/metrics.jsonl"
        return gpu_sections.Section("77. a test section", fresh=(str(runs / "old"),), keep={"test_runs": (str(run),)},
                                 copies={f"{run}/metrics.jsonl": "metrics.jsonl"}, steps=(
            gpu_sections.Step("train", 5, ("-c", f"test ! -e {runs / 'old'} && {train}")),
            gpu_sections.Step("fail", 5, ("-c", "echo broken; exit 3"))))

    def unqueried(c: gpu_sections.Check) -> gpu_sections.Section:
        raise gpu_sections.NoValidation("no validation overrides for +experiment=x: boom")

    monkeypatch.setitem(gpu_sections.SECTIONS, "77", section)
    monkeypatch.setitem(gpu_sections.SECTIONS, "78", unqueried)
    assert gpu_check.main(["78", "77"]) == 0
    with tarfile.open(out / "test_runs.tgz") as tar:
        names = tar.getnames()
    assert "arm-1/metrics.jsonl" in names and not any("checkpoints" in n for n in names)
    assert (out / "metrics.jsonl").read_text() == "4.2\n"
    rows = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [(r["step"], r["rc"]) for r in rows] == [("train", 0), ("fail", 3)]
    log = (out / "gpu_check.log").read_text()
    assert log == capsys.readouterr().out
    assert "!! section 78 skipped: no validation overrides for +experiment=x: boom" in log
    assert "== 77. a test section" in log and "broken\n!! exit 3 after at most 5s: fail" in log
    assert log.splitlines()[-1].startswith("== done")


def _alive(pid: int) -> bool:
    try:
        return "\tZ" not in Path(f"/proc/{pid}/status").read_text().split("State:")[1].splitlines()[0]
    except FileNotFoundError:
        return False


def test_a_step_past_its_limit_is_interrupted_then_killed_and_logged(tmp_path, monkeypatch, capsys):
    """SIGINT at the limit reaches the step's whole process group (a step that handles it, as pytest does, still
    prints its summary); one that ignores it is killed KILL_GRACE seconds later, and nothing a step started
    outlives it. Each outcome is logged."""
    monkeypatch.setattr(gpu_check, "KILL_GRACE", 3)  # time enough for the graceful step on a loaded machine
    c = gpu_sections.Check({"PY": "bash"})
    log, pid = tmp_path / "steps.jsonl", tmp_path / "pid"
    worker = f"(trap '' INT; echo $BASHPID > {pid}; sleep 30) &"  # a run of a multirun, deaf to SIGINT
    graceful = gpu_sections.Step("graceful", 1,
                                 ("-c", f"trap 'echo sum\"\"mary; exit 3' INT; {worker} sleep 30 & wait"))
    stubborn = gpu_sections.Step("stubborn", 1, ("-c", "trap '' INT; sleep 30"))
    quick = gpu_sections.Step("quick", 1, ("-c", "echo done; echo 'a Warning line'"))
    # started with SIGINT ignored, as a background job of a script (or an xdist worker) is: steps still get it
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert [gpu_check.run_step(c, s, log) for s in (graceful, stubborn, quick)] == [124, 137, 0]
    finally:
        signal.signal(signal.SIGINT, previous)
    printed = capsys.readouterr().out
    assert "summary" in printed and "done" in printed and "a Warning line" not in printed
    assert "!! exit 124 after at most 1s: graceful" in printed and not _alive(int(pid.read_text()))
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["step"], r["limit_s"], r["rc"]) for r in rows] == [("graceful", 1, 124), ("stubborn", 1, 137),
                                                                    ("quick", 1, 0)]
    assert rows[2]["command"] == "-c echo done; echo 'a Warning line'"


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
    (d / "step.json").write_text(json.dumps({"preset": "755M", "dtype": "torch.bfloat16",
                                             "ratio_keel_to_compiled": 1.19, "steps": {"keel": keel}}))
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
