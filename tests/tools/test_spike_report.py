"""tools/experiments/spike_report.py on synthetic run folders: the high rate chosen on tuning seeds, each policy
paired against log only per fault design, steps and time lost, events, false fires and the registered verdict."""

import json

import pytest

from tests.tools.spike_runs import fake_run
from tools.experiments import spike_report
from tools.experiments.preregistration import SPIKES, SPIKES_RAMP

pytestmark = pytest.mark.usefixtures("committed_checkout")
NOISE = (0.004, -0.003, 0.002, -0.004, 0.003, -0.002)  # per reported seed 1-6


def _design(root) -> None:
    """Tuning: 1e-2 spikes on one tuning seed only, 3e-2 on both (chosen). Planted: skip and rewind end 0.4-0.5 below
    log only, rewind after one rewind of 23 steps; high rate: skip 0.05 above, rewind's difference noise around 0;
    no fault: skip never fires (identical losses), rewind drops one step on seed 3 (same loss), log flags seed 2."""
    for lr, flags in ((1e-2, (1, 0)), (3e-2, (2, 2)), (1e-1, (5, 5))):
        for seed, flagged in zip((100, 101), flags):
            fake_run(root / "tuning" / f"lr{lr:g}-s{seed}", "spikes_none", seed, lr=lr, flagged=flagged)
    for seed, noise in zip(SPIKES.seeds, NOISE):
        base = 4.0 + 0.01 * seed
        planted = dict(data_path=f"runs/spikes/data/seed{seed}")
        fake_run(root / "planted" / f"none-{seed}", "spikes_none", seed, val=base + 0.5, flagged=10, **planted)
        fake_run(root / "planted" / f"skip-{seed}", "spikes_skip", seed, val=base + noise, flagged=10, dropped=10,
                 **planted)
        fake_run(root / "planted" / f"rewind-{seed}", "spikes_rewind", seed, val=base + 0.1 + noise, flagged=3,
                 rewinds=((143, 120, [140, 141, 142]),), **planted)
        fake_run(root / "high_lr" / f"none-{seed}", "spikes_none", seed, lr=3e-2, val=base + 1.0, flagged=2)
        fake_run(root / "high_lr" / f"skip-{seed}", "spikes_skip", seed, lr=3e-2, val=base + 1.05 + noise / 10,
                 dropped=4, step_time=0.6)
        fake_run(root / "high_lr" / f"rewind-{seed}", "spikes_rewind", seed, lr=3e-2, val=base + 1.0 + noise, dropped=3)
        fake_run(root / "clean" / f"none-{seed}", "spikes_none", seed, val=base, flagged=int(seed == 2))
        fake_run(root / "clean" / f"skip-{seed}", "spikes_skip", seed, val=base)
        fake_run(root / "clean" / f"rewind-{seed}", "spikes_rewind", seed, val=base, dropped=int(seed == 3))


def test_the_report_pairs_each_policy_with_log_only_and_counts_what_recovery_cost(tmp_path, capsys):
    _design(tmp_path / "runs")
    (tmp_path / "runs" / "clean" / "going").mkdir()
    (tmp_path / "runs" / "clean" / "going" / "run_info.json").write_text("{}")  # no result.json yet: left out
    assert spike_report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "spikes.json").read_text())
    assert result["high_lr"]["chosen"] == 0.03 and result["high_lr"]["lrs"]["0.01"] == {"100": 1, "101": 0}
    planted, high, clean = (result["compared"][f] for f in spike_report.FAULTS)
    # planted: both policies lower; the rewind's steps, rows and time, as its event row says
    assert planted["skip"]["minus_none"]["verdict"] == "lower"
    assert planted["skip"]["minus_none"]["mean"] == pytest.approx(-0.5 + sum(NOISE) / 6)
    assert planted["rewind"]["minus_none"]["verdict"] == "lower"
    rewind = next(o for o in result["runs"] if o["run"] == "planted/rewind-1")
    assert (rewind["recomputed_steps"], rewind["steps_lost"], rewind["dropped"], rewind["rewinds"]) == (23, 23, 3, 1)
    assert rewind["data_rows_skipped"] == 16 * (142 + 20 - 120) and rewind["time_lost_s"] == pytest.approx(11.5)
    assert rewind["train_time_s"] == pytest.approx(10 * 0.5 + 11.5)
    assert planted["skip"]["steps_lost"] == 10 and planted["none"]["flagged"] == 10
    # high rate at the chosen rate: skip higher and slower per step (its dropped steps' time is in its rows),
    # rewind within ±0.02 of log only by TOST
    assert high["skip"]["lr"] == 0.03 and high["skip"]["minus_none"]["verdict"] == "higher"
    assert high["skip"]["time_minus_none"]["mean"] == pytest.approx(10 * 0.1)
    assert high["skip"]["time_lost_s"] == pytest.approx(4 * 0.6)
    assert high["rewind"]["minus_none"]["verdict"] == "equivalent within ±0.02"
    # no fault: skip identical to log only (TOST shows it), one false fire each for log only and rewind
    assert clean["skip"]["minus_none"]["mean"] == 0 and clean["skip"]["minus_none"]["equivalence"]["equivalent"]
    assert [clean[p]["fired"] for p in ("none", "skip", "rewind")] == [1, 0, 1]
    verdict = result["verdict"]
    assert verdict["label"] == "partly reproduced" and verdict["saved"] == {"planted rows": ["skip", "rewind"]}
    assert verdict["line"].startswith("> **Verdict: partly reproduced (CPU, 6 seeds paired): skip and rewind saved "
                                      "planted rows.** planted rows (lr 0.003): final val loss minus log only skip")
    assert "runs without a fault that fired: none 1/6, skip 0/6, rewind 1/6" in verdict["line"]
    assert verdict["line"] in printed and result["val_digests"] == {"val_loss": ["clean-set"]}
    assert result["provenance"]["run_git_revisions"] and (tmp_path / "out" / "spikes.png").stat().st_size > 0


def test_a_design_without_runs_is_named_and_a_seed_twice_is_refused(tmp_path, capsys):
    fake_run(tmp_path / "a" / "tune", "spikes_none", 100, lr=1e-1)
    fake_run(tmp_path / "a" / "tune2", "spikes_none", 101, lr=1e-1)
    for lr in (1e-2, 3e-2):  # no rate spiked on both tuning seeds: the high-rate design is not run
        for seed in (100, 101):
            fake_run(tmp_path / "a" / f"t{lr:g}-{seed}", "spikes_none", seed, lr=lr)
    for seed in (1, 2):
        fake_run(tmp_path / "a" / f"clean-none-{seed}", "spikes_none", seed, val=4.0 + seed * 0.01)
        fake_run(tmp_path / "a" / f"clean-skip-{seed}", "spikes_skip", seed, val=4.0 + seed * 0.01)
    result = spike_report.report([tmp_path / "a"], tmp_path / "out", "s")
    assert result["high_lr"] == {**result["high_lr"], "chosen": None, "settled": True}
    assert result["verdict"]["label"] == "inconclusive" and result["verdict"]["missing"] == ["planted rows"]
    assert "high rate: no rate of 0.01, 0.03, 0.1 made plain AdamW spike" in result["verdict"]["line"]
    assert "planted rows: not run" in result["verdict"]["line"]
    assert result["verdict"]["headline"] == "inconclusive (CPU, 2 seeds paired): planted rows not run yet"
    capsys.readouterr()
    fake_run(tmp_path / "b" / "x", "spikes_skip", 1)
    fake_run(tmp_path / "c" / "x", "spikes_skip", 1)
    assert spike_report.main([str(tmp_path / "b"), str(tmp_path / "c"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "are both seed 1 of skip on no fault" in err


def test_the_ramp_is_judged_on_its_high_rate_alone_and_refuses_another_designs_runs(tmp_path, capsys):
    """Tuning: a peak of 0.5 spikes on one seed only, 1 on both (chosen); at 1 skip ends 0.05 above log only
    and rewind 0.1 below: saved by rewind."""
    root, ramp = tmp_path / "runs", dict(warmup=SPIKES_RAMP.warmup_steps)
    for lr, flags in ((0.5, (1, 0)), (1.0, (2, 2)), (2.0, (5, 5))):
        for seed, flagged in zip(SPIKES_RAMP.tuning_seeds, flags):
            fake_run(root / "tuning" / f"lr{lr:g}-s{seed}", "spikes_none", seed, lr=lr, flagged=flagged, **ramp)
    for seed, noise in zip(SPIKES_RAMP.seeds, NOISE):
        base = 4.0 + 0.01 * seed
        fake_run(root / "high_lr" / f"none-{seed}", "spikes_none", seed, lr=1.0, val=base + 1.0, flagged=2, **ramp)
        fake_run(root / "high_lr" / f"skip-{seed}", "spikes_skip", seed, lr=1.0, val=base + 1.05 + noise / 10,
                 dropped=2, **ramp)
        fake_run(root / "high_lr" / f"rewind-{seed}", "spikes_rewind", seed, lr=1.0, val=base + 0.9 + noise,
                 rewinds=((60, 40, [57, 58, 60]),), **ramp)
    assert spike_report.main([str(root), "--design", "spikes_ramp", "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "spikes_ramp.json").read_text())
    assert result["design"] == "spikes_ramp" and result["high_lr"]["chosen"] == 1.0
    assert list(result["compared"]) == ["high rate"] and (tmp_path / "out" / "spikes_ramp.png").stat().st_size > 0
    verdict = result["verdict"]
    assert verdict["label"] == "saved" and verdict["saved"] == {"high rate": ["rewind"]}
    assert verdict["line"].startswith("> **spikes_ramp: saved (CPU, 6 seeds paired): rewind saved the high rate.** "
                                      "high rate (peak lr 1 after 100 steps of warmup): final val loss minus log "
                                      "only skip +0.050")
    assert "SPIKES's no-fault runs'" in verdict["line"] and verdict["line"] in capsys.readouterr().out
    # a run of SPIKES (no warmup) among the roots: refused with one line, nothing written
    fake_run(root / "spikes_high_lr" / "none-1", "spikes_none", 1, lr=1.0)
    assert spike_report.main([str(root), "--design", "spikes_ramp", "--out", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ran lr.warmup_steps=0, not spikes_ramp's 100" in err
    assert not (tmp_path / "again").exists()


def test_the_ramp_is_not_run_when_no_peak_spiked_on_every_tuning_seed():
    chosen = {"lrs": {}, "seeds": [100, 101], "chosen": None, "settled": True}
    judged = spike_report.ramp_verdict({}, chosen)
    assert judged["label"] == "not run" and judged["saved"] == {}
    assert "no peak rate of 0.5, 1, 2 after 100 steps of warmup made plain AdamW spike" in judged["line"]
    assert spike_report.ramp_verdict({}, {**chosen, "settled": False})["label"] == "inconclusive"
