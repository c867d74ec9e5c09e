"""Collect what `bash tools/gpu_check.sh triage` measured into one JSON and one markdown page.

    python tools/triage_report.py OUT_DIR              # after the steps: triage.json and triage.md
    python tools/triage_report.py --versions OUT_DIR   # the first step: what runs it

Reads OUT_DIR/triage/ (written by the triage's steps; any of them may be missing when its step failed or
ran out of time, which the page then says): versions.json, steps.jsonl (each step's limit, exit code and
seconds), tests.xml (pytest's JUnit report), decode.json (bench_decode.py --save), step.json
(bench_step.py --json) and profile.json (profile_step.py --json). Writes OUT_DIR/triage.json and
OUT_DIR/triage.md, a section ready for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from pretrain.rundir import write_json


def _load(path: Path):
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        return {"unreadable": f"{path.name}: {error}"}


def tests_summary(path: Path) -> dict | None:
    """pytest's counts and the failed tests' ids from its JUnit XML (written even when it was interrupted)."""
    if not path.exists():
        return None
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return counts | {"passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
                     "seconds": float(suite.get("time", 0)), "failed": failed}


def collect(out: Path) -> dict:
    d = out / "triage"
    log = d / "steps.jsonl"
    steps = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return {"versions": _load(d / "versions.json"), "steps": steps, "tests": tests_summary(d / "tests.xml"),
            "decode": _load(d / "decode.json"), "decode_sdpa": _load(d / "decode_sdpa.json"),
            "step": _load(d / "step.json"), "profile": _load(d / "profile.json")}


def markdown(t: dict) -> str:
    from tools.profile_step import markdown as profile_markdown

    v = t["versions"] or {}
    found = ", ".join(f"{k} {v[k]}" for k in ("python", "torch", "megatron_core", "cuda", "triton") if k in v)
    lines = [f"### Triage on {v.get('device', 'an unknown device')}", "",
             f"`bash tools/gpu_check.sh triage`; {found}; keel {v.get('git_revision', 'unknown revision')}.", ""]
    lines += ["| step | limit (s) | took (s) | exit |", "|---|---:|---:|---:|"]
    lines += [f"| `{s['step']}` | {s['limit_s']} | {s['seconds']} | {s['rc']} |" for s in t["steps"]]
    lines.append("")
    tests = t["tests"]
    lines.append("**GPU-only tests:** " + ("not run (no report)" if tests is None else
                 f"{tests['passed']} passed, {tests['failures'] + tests['errors']} failed, {tests['skipped']} skipped "
                 f"in {tests['seconds']:.0f} s" + "".join(f"\n- failed: `{name}`" for name in tests["failed"])))
    lines.append("")
    rows = (t["decode"] or []) + (t["decode_sdpa"] or [])
    lines.append("**Decoding** (batch × context as measured; tokens/s, share of the HBM peak, ratio to GQA at the "
                 "same kernel, what attended):")
    lines += ["", "| attention | batch | context | tok/s | share of peak | vs GQA | attended by |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows if isinstance(rows, list) else []:
        if r.get("tokens_per_s") is None:
            lines.append(f"| {r['attention']} | {r['batch']} | {r['context']} | out of memory | | | |")
            continue
        share = f"{r['hbm_share']:.0%}" if r.get("hbm_share") is not None else "-"
        ratio = f"{r['ratio_to_gqa']:.2f}x" if r.get("ratio_to_gqa") else "-"
        lines.append(f"| {r['attention']} | {r['batch']} | {r['context']} | {r['tokens_per_s']:,.0f} | {share} "
                     f"| {ratio} | {r.get('attention_kernel', '-')} |")
    if not rows:
        lines.append("\nnot measured (no rows)")
    lines.append("")
    step = t["step"]
    if step and "steps" in step:
        lines.append(f"**Training step** ({step.get('preset')}, {step['dtype']}): keel / compiled plain time ratio "
                     f"{step['ratio_keel_to_compiled']:.3f}")
        lines += ["", "| model | ms | tokens/s | MFU | peak GiB |", "|---|---:|---:|---:|---:|"]
        for name, r in step["steps"].items():
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
            peak = f"{r['peak_bytes'] / 2**30:.1f}" if r.get("peak_bytes") is not None else "-"
            lines.append(f"| {name} | {r['ms']:.1f} | {r['tokens_per_s']:,.0f} | {mfu} | {peak} |")
    else:
        lines.append("**Training step:** not measured")
    lines.append("")
    profile = t["profile"]
    lines.append(f"**Profile of keel's step** ({profile.get('preset') if profile else '-'}):")
    lines += ["", profile_markdown(profile) if profile and "top" in profile else "not measured"]
    return "\n".join(lines) + "\n"


def write_versions(out: Path) -> dict:
    """What ran the triage: the device, Python, torch, megatron-core, CUDA, Triton and keel's revision
    (KEEL_REVISION where the copy on the device has no git history: pretrain.rundir.git_revision)."""
    import triton

    from pretrain.rundir import device_name, git_revision, versions

    found = versions() | {"triton": triton.__version__, "device": device_name(),
                          "git_revision": git_revision()}
    write_json(out / "triage" / "versions.json", found)
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--versions", action="store_true", help="only record the versions (the triage's first step)")
    args = p.parse_args(argv)
    if args.versions:
        (args.out / "triage").mkdir(parents=True, exist_ok=True)
        print(json.dumps(write_versions(args.out)))
        return 0
    if not (args.out / "triage").is_dir():
        print(f"keel: no {args.out / 'triage'}: run `bash tools/gpu_check.sh triage` with OUT={args.out}",
              file=sys.stderr)
        return 2
    triage = collect(args.out)
    write_json(args.out / "triage.json", triage, indent=2)
    page = markdown(triage)
    (args.out / "triage.md").write_text(page)
    print(page)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
