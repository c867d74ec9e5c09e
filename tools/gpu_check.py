"""keel's checks on a lent NVIDIA GPU (bf16, nccl):   bash tools/gpu_check.sh SECTION [SECTION...]

This module runs the sections; tools/gpu_sections.py defines them, each a function that returns its table of
time-boxed steps (name, limit, command), its docstring saying what it checks. `bash tools/gpu_check.sh --list`
lists them. Numbers group sections by area; later work adds its own (21, 31, 41, ...). `triage` runs before
any other section until it has run once.

A lent GPU gives about 15 minutes in all, so one call runs one or two sections. A step gets SIGINT at its
limit, so pytest still prints its summary and writes its report, and SIGKILL KILL_GRACE seconds later (its
whole process group: nothing a step starts outlives it). The limits of a section's steps, each with
KILL_GRACE, add up to its budget (SECTION_BUDGET; TRIAGE_BUDGET for the triage; checked by
tests/tools/test_gpu_check.py), which with the install and the machine's start fits the 8 minutes a section
may take (9 for the triage). Every step's name, command, limit, exit code and seconds go to the steps log
($STEPS_LOG, by default $OUT/steps.jsonl; the triage's to $OUT/triage/steps.jsonl), and everything printed
to $OUT/gpu_check.log.

The image lacks megatron-core and Hydra: `bash tools/fetch_wheels.sh` puts them in .whl/ here, the call
carries .whl, and the first step installs them with pip --no-index into /tmp/site, as a cluster without
internet would; this module imports nothing but the standard library, so nothing imports keel's
dependencies before that install. The copy on the device has no git history: call the script as
`KEEL_REVISION=<commit> bash tools/gpu_check.sh ...` from a clean, committed tree, so that runs and reports
record that commit (pretrain.rundir.git_revision) rather than "unknown", which the reports refuse.

Settings from the environment: PY (the interpreter, default this one), OUT (default /tmp/keel-gpu-out),
PRECISION (default bf16), TIME_SCALE (limits x this: a CPU trial's time), REHEARSAL=1 (the triage at CPU
shapes), VAL_TOKENS (the claim sections' validation tokens per set), KEEL_REVISION, and each section's knobs
that shrink it to try it on a CPU first (WF_*, PACK_*, WIDTH_*, MOE_*, ATTN_*; its docstring names them):
    REHEARSAL=1 PRECISION=fp32 TIME_SCALE=4 PY=.venv/bin/python bash tools/gpu_check.sh triage
    PRECISION=fp32 TIME_SCALE=4 PY=.venv/bin/python VAL_TOKENS=32768 WF_LRS=1e-2 WF_SEEDS="1 2" WF_STEPS=20 \
        WF_JOBS=3 bash tools/gpu_check.sh 41

The steps that need keel call this module back, after the install: `--versions`, `--validation TOKENS
PERCENT FILL OVERRIDES...`, `--prepare OVERRIDES...` and `--run-summary RUN_DIR`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Callable, TextIO

from tools.gpu_sections import QUERY_LIMIT, ROOT, SECTIONS, SITE, STEP_ENV, Check, NoValidation, Step

SECTION_BUDGET = 300
TRIAGE_BUDGET = 490
INSTALL_BUDGET = 45
KILL_GRACE = 5
QUIET = ("Warning", "warnings.warn")  # lines left out of the log

def budget(name: str) -> int:
    return TRIAGE_BUDGET if name == "triage" else SECTION_BUDGET


# --- Running steps ------------------------------------------------------------------------------------------
def say(line: str) -> None:
    print(line, flush=True)


def _relay(stream, log: Callable[[str], None]) -> None:
    for line in stream:
        if not any(q in line for q in QUIET):
            log(line.rstrip("\n"))


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # the group has ended
        pass


def _wait(proc: subprocess.Popen, limit: float) -> int:
    """The step's exit code; 124 when it ran past its limit and ended on SIGINT, 137 when it needed SIGKILL."""
    try:
        return proc.wait(limit)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGINT)
    try:
        proc.wait(KILL_GRACE)
        return 124
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()
        return 137


def _sigint_by_default() -> None:
    """In the step's process, before it runs: SIGINT as the default. A process started with SIGINT ignored
    (a background job of a script, an xdist worker) passes that on, and a shell or Python step could then
    neither catch the SIGINT at its limit nor die of it, only be killed."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_step(c: Check, step: Step, steps_log: Path) -> int:
    """One time-boxed step in its own process group; its output in the log, its outcome in `steps_log`."""
    limit = round(step.limit_s * c.time_scale)
    start = time.monotonic()
    proc = subprocess.Popen([c.py, *step.argv], cwd=ROOT, env={**os.environ, **STEP_ENV}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True,
                            preexec_fn=_sigint_by_default)
    relay = threading.Thread(target=_relay, args=(proc.stdout, say), daemon=True)
    relay.start()
    interrupted = False
    try:
        rc = _wait(proc, limit)
    except KeyboardInterrupt:  # the call itself was interrupted: so is its step, which may still save and report
        interrupted, rc = True, 130
        _signal_group(proc, signal.SIGINT)
        try:
            proc.wait(KILL_GRACE)
        except subprocess.TimeoutExpired:
            pass
    finally:
        _signal_group(proc, signal.SIGKILL)  # what the step left running
        relay.join(KILL_GRACE)
    seconds = round(time.monotonic() - start)
    command = " ".join(step.argv)
    if rc:
        say(f"!! exit {rc} after at most {limit}s: {step.name}: {command}")
    steps_log.parent.mkdir(parents=True, exist_ok=True)
    with steps_log.open("a") as f:
        f.write(json.dumps({"step": step.name, "command": command, "limit_s": limit, "rc": rc, "seconds": seconds})
                + "\n")
    if interrupted:
        raise KeyboardInterrupt
    return rc


def run_section(c: Check, name: str) -> None:
    try:
        section = SECTIONS[name](c)
    except NoValidation as e:
        say(f"!! section {name} skipped: {e}")
        return
    say(f"== {section.title}  ({time.strftime('%H:%M:%S', time.gmtime())})")
    for folder in section.fresh:
        shutil.rmtree(folder, ignore_errors=True)
    for step in section.steps:
        run_step(c, step, section.steps_log or c.steps_log)
    for source, target in section.copies.items():
        if Path(source).exists():
            shutil.copy(source, c.out / target)
    for archive, folders in section.keep.items():  # the run folders, for the report's page
        if found := [ROOT / f for f in folders if (ROOT / f).exists()]:
            with tarfile.open(c.out / f"{archive}.tgz", "w:gz") as tar:
                for folder in found:
                    name = folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else Path(folder.name)
                    tar.add(folder, arcname=str(name),
                            filter=lambda info: None if "checkpoints" in Path(info.name).parts else info)


def install(c: Check) -> None:
    """What the image lacks, from carried wheels only; then what the steps will run on."""
    if wheels := sorted(str(w.relative_to(ROOT)) for w in (ROOT / ".whl").glob("*.whl")):
        run_step(c, Step("install", INSTALL_BUDGET, ("-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                                     "--no-compile", "--no-cache-dir", "--upgrade", "--target", SITE,
                                                     *wheels)), c.steps_log)
    for argv in (["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"],
                 [c.py, "-m", "tools.gpu_check", "--versions"]):
        try:
            proc = subprocess.run(argv, cwd=ROOT, env={**os.environ, **STEP_ENV}, capture_output=True, text=True,
                                  timeout=QUERY_LIMIT)
            say((proc.stdout + proc.stderr).strip().splitlines()[-1] if proc.returncode else proc.stdout.strip())
        except (OSError, subprocess.TimeoutExpired, IndexError):
            pass  # no nvidia-smi: a CPU trial


class Tee:
    """What the call prints, also appended to $OUT/gpu_check.log."""

    def __init__(self, stream: TextIO, file: TextIO):
        self.stream, self.file = stream, file

    def write(self, text: str) -> int:
        self.file.write(text)
        self.file.flush()
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


# --- The steps that need keel (run after the install) --------------------------------------------------------
def versions() -> str:
    import torch

    from pretrain.rundir import git_revision, versions as found

    v = found()
    return (f"python {v['python']} torch {v['torch']} megatron-core {v['megatron_core']} cuda "
            f"{torch.cuda.is_available()} keel {git_revision()}")


def validation_overrides(tokens: int, percent: str, fill: float, overrides: list[str]) -> str:
    from pretrain.config import compose_config

    cfg = compose_config([*overrides, f"data.val_percent={percent}"])
    row = cfg.trainer.global_batch_size * cfg.data.seq_len
    return (f"data.val_percent={percent} trainer.eval_batches={math.ceil(tokens / (row * fill))} "
            f"trainer.eval_interval={cfg.trainer.max_steps}")


def prepare(overrides: list[str]) -> str:
    """The tokenizer and packed sets a preset's runs share, built once before a multirun's workers start."""
    from data.prepare import ensure_packed, ensure_tokenizer
    from pretrain.config import compose_config

    data = compose_config(overrides).data
    return str(ensure_packed(data, ensure_tokenizer(data)))


def run_summary(run_dir: str) -> str:
    from pretrain.rundir import read_metrics

    rows = read_metrics(Path(run_dir))
    if not rows:
        raise SystemExit(f"keel: no metrics in {run_dir}")
    trained = [r for r in rows if "loss" in r]  # a step-0 validation row (init_from) has no training loss
    return f"loss {trained[0]['loss']} -> {trained[-1]['loss']} val {[r['val_loss'] for r in rows if 'val_loss' in r]}"


HELPERS: dict[str, Callable[[list[str]], str]] = {
    "--versions": lambda args: versions(),
    "--validation": lambda args: validation_overrides(int(args[0]), args[1], float(args[2]), args[3:]),
    "--prepare": prepare,
    "--run-summary": lambda args: run_summary(args[0])}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in HELPERS:
        print(HELPERS[argv[0]](argv[1:]))
        return 0
    names = " ".join(SECTIONS)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print(f"\nsections: {names}")
        return 0
    if not argv or argv[0] == "--list":
        print(f"usage: bash tools/gpu_check.sh SECTION... (sections: {names})")
        if argv:
            for section in SECTIONS.values():
                print(f"  {section(Check(os.environ, dry=True)).title}")
        return 0 if argv else 2
    if unknown := [s for s in argv if s not in SECTIONS]:
        print(f"keel: no section {unknown[0]} in tools/gpu_sections.py (sections: {names})", file=sys.stderr)
        return 2
    c = Check(os.environ)
    for knob, kind, example in (("TIME_SCALE", float, "4 for a CPU trial"), ("VAL_TOKENS", int, "32768")):
        try:
            kind(c.knob(knob, "1"))
        except ValueError:
            print(f"keel: {knob}={c.knob(knob, '')} is not {'a whole' if kind is int else 'a'} number; set it to one "
                  f"(e.g. {example}) or leave it out", file=sys.stderr)
            return 2
    c.out.mkdir(parents=True, exist_ok=True)
    with (c.out / "gpu_check.log").open("a") as log:
        tee = Tee(sys.stdout, log)
        with contextlib.redirect_stdout(tee), contextlib.redirect_stderr(tee):
            try:
                install(c)
                for name in argv:
                    run_section(c, name)
            except KeyboardInterrupt:  # the running step had SIGINT too, and its outcome is logged
                say("!! interrupted")
                return 130
            say(f"== done  ({time.strftime('%H:%M:%S', time.gmtime())})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
