"""A two-point Hydra sweep (`-m`) through pretrain/main.py: one run folder and result.json per point,
a diverging point recorded as diverged without stopping the sweep, the report reading it all, and the sweep
relaunched on another machine from its runs' records alone (tools/experiments/run_records.py)."""

import json
from pathlib import Path

import pytest

from tests.helpers import metrics, run_keel, tiny_overrides

pytestmark = pytest.mark.slow


def _sweep_overrides(data: dict, sweep_dir: Path) -> list[str]:
    # run_dir is ignored in a multirun (one folder per run under hydra.sweep.dir)
    skip = ("run_dir=", "+experiment=")
    over = [o for o in tiny_overrides(data, sweep_dir / "unused", steps=4) if not o.startswith(skip)]
    # folders are normally named by the overrides; this many overrides exceed a name's 255 bytes
    subdir = "hydra.sweep.subdir=w${model.hidden_size}_lr${optim.lr}"
    return ["-m", *over, subdir, f"hydra.sweep.dir={sweep_dir}", "+experiment=width_sweep", "data.seq_len=64",
            "model.max_seq_len=64", "model.head_dim=16", "trainer.global_batch_size=8", "trainer.micro_batch_size=4",
            "trainer.eval_interval=4", "trainer.eval_batches=1", "lr.warmup_steps=0", "optim.lr_rule=sp_width",
            "optim.base_width=32"]


def test_two_point_sweep_runs_each_point_and_reports(tiny_data, tmp_path):
    sweep = tmp_path / "sweep"
    # 1. two widths x one LR, plus an absurd LR at width 32 that must diverge (non-finite after one step)
    run_keel(_sweep_overrides(tiny_data, sweep) + ["model.hidden_size=32,64", "optim.lr=3e-3"])
    run_keel(_sweep_overrides(tiny_data, sweep) + ["model.hidden_size=32", "optim.lr=1e30"])
    results = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/result.json")}
    assert len(results) == 3, sorted(results)
    ok = [r for r in results.values() if r["lr"] == 3e-3]
    assert sorted(r["hidden_size"] for r in ok) == [32, 64] and all(r["status"] == "completed" for r in ok)
    assert all(isinstance(r["final_val_loss"], float) for r in ok)
    # 2. the width rule acted inside the sweep: lr/<group> in metrics follows (n / n0)^-0.42
    wide = next(p.parent for p in sweep.glob("*/result.json") if p.parent.name.startswith("w64_"))
    assert metrics(wide)[0]["lr/hidden"] == pytest.approx(metrics(wide)[0]["lr"])
    peak = max(m["lr/hidden"] for m in metrics(wide))
    assert peak == pytest.approx(3e-3 * 2 ** -0.42, rel=1e-6)
    # 3. the report parses the real sweep
    from tools.sweep_report import load_runs, report

    runs = load_runs(sweep)
    assert len(runs) == 3 and [r.status for r in runs if r.lr > 1].count("diverged") == 1
    # under a width rule the report's LR axis is the hidden group's peak LR
    assert {r.width: r.lr for r in runs if r.lr < 1}[64] == pytest.approx(peak)
    out = report(sweep, tmp_path / "report")
    summary = json.loads((tmp_path / "report" / "sweep_report.json").read_text())
    assert set(summary["widths"]) == {"32", "64"} and out["n_runs"] == 3
    assert (tmp_path / "report" / "loss_vs_lr.png").stat().st_size > 0
    # 4. the records, without checkpoints, unpacked elsewhere: relaunched, each finished run ends at once
    from tools.experiments.run_records import pack, unpack

    pack([sweep], tmp_path / "records.tar.xz", [], tmp_path)
    elsewhere = tmp_path / "elsewhere"
    unpack([tmp_path / "records.tar.xz"], elsewhere)
    out = run_keel(_sweep_overrides(tiny_data, elsewhere / "sweep") + ["model.hidden_size=32,64", "optim.lr=3e-3"])
    assert out.stdout.count("completed at step 4 already (its result.json): nothing to train") == 2, out.stdout
    assert not list((elsewhere / "sweep").glob("*/checkpoints/step_*"))  # nothing trained, nothing saved
    for run in sweep.glob("*/metrics.jsonl"):
        assert (elsewhere / "sweep" / run.parent.name / "metrics.jsonl").read_text() == run.read_text()
