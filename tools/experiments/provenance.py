"""Provenance: `results_provenance`, what every results JSON opens with (the commit, commands, device and
versions of its runs, and the one digest of each validation set they scored), refusing a report from an
uncommitted tree, a run trained from one, and a run that scored a validation set without its digest;
`one_validation_set` refuses runs that scored different text."""

from __future__ import annotations

from typing import Iterable

from pretrain.rundir import runs_provenance, scored_validation
from tools.experiments import ExperimentError
from tools.experiments.runs import Run, is_number


def one_validation_set(infos: Iterable[dict]) -> dict[str, list[str]]:
    """Validation set -> the digest of the text the runs scored on it (run_info.json); an error when runs
    scored different text: a report compares every loss it reads with others, so a stale run from another
    split or size left below its roots must not slip in."""
    digests = {name: v["digests"] for name, v in scored_validation(infos).items()}
    if mixed := {name: len(d) for name, d in digests.items() if len(d) > 1}:
        sets = ", ".join(f"{name} ({n} different texts)" for name, n in mixed.items())
        raise ExperimentError(f"the runs scored different validation sets: {sets}; remove the stale runs or rerun "
                              "them on one set")
    return digests


def committed(revision: str | None) -> bool:
    """A revision names a commit: recorded, known, and not "+dirty" (uncommitted changes to tracked files)."""
    return bool(revision) and revision not in ("unknown", "unrecorded") and not revision.endswith("+dirty")


def scored_sets(run: Run) -> set[str]:
    """The validation sets a run logged a loss on: val_loss and val_loss/NAME (data.val_sets)."""
    return {key for row in run.rows for key, value in row.items()
            if (key == "val_loss" or key.startswith("val_loss/")) and is_number(value)}


def results_provenance(runs: Iterable[Run]) -> dict:
    """{"provenance", "val_digests"}: where a results JSON comes from (pretrain.rundir.runs_provenance) and
    the one digest of each validation set its runs scored. A report calls it before it writes anything,
    and it refuses, in one line: a report from a tree with uncommitted changes, a run trained from one (or
    that recorded no revision), a run that scored a validation set without recording its digest, and runs
    that scored different text. Every number in a results JSON can then be traced to a commit and to the
    exact validation text."""
    runs = list(runs)
    prov = runs_provenance([r.info for r in runs])
    if not committed(prov["git_revision"]):
        raise ExperimentError(f"this checkout is at git revision {prov['git_revision']}, not a commit: commit (or "
                              "stash) the changes to tracked files, then report again; a results JSON comes from "
                              "a committed tree")
    if dirty := [r for r in runs if not committed(r.info.get("git_revision"))]:
        raise ExperimentError(f"{len(dirty)} run(s) were not trained from a commit, e.g. {dirty[0].folder} (git "
                              f"revision {dirty[0].info.get('git_revision', 'unrecorded')}); rerun them from a "
                              "committed tree")
    for run in runs:
        if missing := sorted(scored_sets(run) - set(run.info.get("validation", {}))):
            raise ExperimentError(f"{run.folder} scored {', '.join(missing)} but its run_info.json records no digest "
                                  "of that text (a run from before keel recorded them); rerun it")
    return {"provenance": prov, "val_digests": one_validation_set(r.info for r in runs)}
