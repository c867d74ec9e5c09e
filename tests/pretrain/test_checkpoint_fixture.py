"""A checkpoint written by an older keel still resumes, and the resumed steps equal the ones that run
logged, to float32 rounding: tests/fixtures/gla_before_attention_registry is a 1-layer GLA run (the most involved
of keel's own attention modules) made at commit e5fd906, before attention types owned their configs,
specs and decode steps (issue 31). It holds the tokenizer, the packed data, the run folder with its
step-3 checkpoint, and the metrics of all 6 steps of the run that was not interrupted.

Those metrics were logged on another machine. A CPU of another kind may sum a float32 reduction in another
order (its kernels' vector width) and round the gradient norm an ulp apart, so the resumed steps are compared
at a relative 1e-6 (8 float32 ulps), not bit for bit: a resume that lost any state (the moments, the data
position, the schedule) is off by orders of magnitude more. Bit-exact resume on one machine is
tests/pretrain/test_train_e2e.py's."""

import json
import shutil

import pytest

from tests.helpers import ROOT, metrics, run_keel

FIXTURE = ROOT / "tests" / "fixtures" / "gla_before_attention_registry"
MADE_AT = "/work/fixture31/gla"  # where the fixture was made; its command names that folder


def test_a_checkpoint_from_before_the_attention_registry_resumes_exactly(tmp_path):
    folder = tmp_path / "fixture"
    shutil.copytree(FIXTURE, folder)
    info = json.loads((folder / "run" / "run_info.json").read_text())
    assert info["git_revision"].startswith("e5fd906")
    overrides = info["command"].replace(MADE_AT, str(folder)).split()[1:]  # less pretrain/main.py
    overrides.append("trainer.log_interval=1")  # the default when it was made (now 10): every step's row
    run_keel(overrides)
    after = json.loads((folder / "run" / "run_info.json").read_text())
    assert "step_00000003" in str(after["resumed_from"])  # resumed, not trained again from the same seed
    resumed = {row["step"]: row for row in metrics(folder / "run")}
    logged = (folder / "expected_metrics.jsonl").read_text().splitlines()
    expected = {row["step"]: row for row in map(json.loads, logged)}
    assert sorted(resumed) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step]["lr"] == expected[step]["lr"], step
        for key in ("loss", "grad_norm"):
            assert resumed[step][key] == pytest.approx(expected[step][key], rel=1e-6, abs=0), (step, key)
    assert resumed[6]["val_loss"] == pytest.approx(expected[6]["val_loss"], rel=1e-6, abs=0)
