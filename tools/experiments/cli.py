"""The command line every driver (`driver_parser`) and report (`report_parser`) takes, and `guarded`, which
turns a problem with the runs into one line and exit code 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from tools.experiments import ExperimentError


def report_parser(doc: str, name: str | None = None) -> argparse.ArgumentParser:
    """ROOT ... --out DIR [--name STEM]: the arguments every report takes."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("roots", type=Path, nargs="+", help="folders holding the run folders (any depth)")
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON and the plots")
    if name:
        p.add_argument("--name", default=name, help="stem of the files written into --out")
    return p


def driver_parser(doc: str, stages: tuple[str, ...], report: str | None = None) -> argparse.ArgumentParser:
    """--stage, --jobs, --concurrent, --dry-run, --force, --set: the arguments every experiment driver takes; with
    `report` (the stem of its report's files) also --out and --name."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if report:
        p.add_argument("--out", type=Path, default=Path("docs/results"), help="folder for the report's JSON and plots")
        p.add_argument("--name", default=report, help="stem of the report's files")
    p.add_argument("--stage", nargs="+", choices=("all", *stages), default=["all"],
                   help="the stages to run, in the order given (default: all, in order)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (hydra.launcher.n_jobs), one core each")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--force", action="store_true", help="redo stages that are done (their folders removed)")
    p.add_argument("--concurrent", action="store_true",
                   help="launch a stage's multiruns all at once rather than one after another (a machine with "
                        "cores and a GPU to spare: --jobs runs each, so jobs x multiruns in all)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="Hydra overrides added to every training run and to the presets the driver reads (its "
                        "packed sets, validation rows), e.g. trainer.precision=bf16 on a GPU (tools/gpu_check.py)")
    return p


def chosen_stages(args: argparse.Namespace, stages: tuple[str, ...]) -> tuple[str, ...]:
    """The stages --stage names, or every one of `stages` in order for "all"."""
    return stages if "all" in args.stage else tuple(args.stage)


def guarded(report: Callable[[], None]) -> int:
    """Run a report; a problem with its runs is one line on stderr and exit code 2."""
    try:
        report()
    except ExperimentError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        return 2
    return 0
