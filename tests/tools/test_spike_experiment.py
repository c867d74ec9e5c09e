"""tools/experiments/spike_experiment.py and the designs it runs: the page states preregistration.SPIKES and
SPIKES_RAMP as the code has them, the presets run them, and the stages (plant, tune, runs) launch what is missing
and skip what finished (no training: a stand-in launcher writes finished run folders)."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.tools.spike_runs import fake_run
from tools.experiments import spike_experiment as se
from tools.experiments import spike_report
from tools.experiments.preregistration import SPIKES, SPIKES_RAMP

PAGE = ROOT / "docs" / "results" / "spikes.md"
CLEAN = se.Data("CACHE/train", "CACHE/val", 16)


@pytest.mark.parametrize("design, prefix", [(SPIKES, "SPIKES"), (SPIKES_RAMP, "SPIKES_RAMP")])
def test_the_page_states_each_registered_design_as_the_code_has_it(design, prefix):
    stated = dict(re.findall(rf"^\| `({prefix}\.[a-z_]+)` \| `([^`]+)` \|", PAGE.read_text(), re.MULTILINE))
    expected = {f"{prefix}.{f.name}": getattr(design, f.name) for f in dataclasses.fields(design)}
    assert set(stated) == set(expected)
    for key, text in stated.items():
        assert eval(text, {"range": range, "tuple": tuple}) == expected[key], key


def test_the_presets_run_the_registered_designs():
    from pretrain.config import compose_config
    from tools.experiments.seeds import REPORTED_SEEDS, TUNING_SEEDS

    for arm, action in zip(SPIKES.arms, ("log", "skip", "rewind")):
        cfg = compose_config([f"+experiment={arm}"])
        assert (cfg.trainer.max_steps, cfg.optim.lr, cfg.logging.monitors.spike.action) == (SPIKES.steps,
                                                                                             SPIKES.base_lr, action)
        # a rewind finds a checkpoint from before a burst of rewind.within steps among those kept
        assert cfg.checkpoint.interval * cfg.checkpoint.keep_last > cfg.logging.monitors.spike.rewind.within
        assert cfg.logging.monitors.spike.min_count < SPIKES.plant_start < SPIKES.steps
    assert len(SPIKES.seeds) >= 5 and set(SPIKES.seeds) <= set(REPORTED_SEEDS)
    assert set(SPIKES.tuning_seeds) <= set(TUNING_SEEDS) and min(SPIKES.lrs) > SPIKES.base_lr
    # the ramp: SPIKES's presets (cosine without warmup, which its lr.warmup_steps replaces) and seeds, its peak
    # rate after the detector judges and before the end
    assert (cfg.lr.name, cfg.lr.warmup_steps, SPIKES_RAMP.steps) == ("cosine", 0, SPIKES.steps)
    assert cfg.logging.monitors.spike.min_count < SPIKES_RAMP.warmup_steps < SPIKES_RAMP.steps
    assert (SPIKES_RAMP.arms, SPIKES_RAMP.tuning_seeds, SPIKES_RAMP.seeds) == (SPIKES.arms, SPIKES.tuning_seeds,
                                                                              SPIKES.seeds)
    assert min(SPIKES_RAMP.lrs) > SPIKES.base_lr


def _fake_launch(launched: list):
    """A stand-in for the driver's processes: a planted copy's JSON, or a finished run per point of a multirun
    (the log arm flags a spike from 3e-2 up)."""
    def launch(argv):
        launched.append(argv)
        values = dict(a.split("=", 1) if "=" in a else (a, "") for a in argv)
        if argv[0] == "tools/plant_spikes.py":
            out = argv[argv.index("--output") + 1]
            Path(f"{out}.json").write_text("{}")
            return
        folder, warmup = Path(values["hydra.sweep.dir"]), int(values.get("lr.warmup_steps", 0))
        for preset in values["+experiment"].split(","):
            for lr in map(float, values.get("optim.lr", f"{SPIKES.base_lr}").split(",")):
                for seed in map(int, values["seed"].split(",")):
                    if not (run := folder / preset / f"lr{lr:g}-seed{seed}").exists():  # a finished run ends at once
                        fake_run(run, preset, seed, lr=lr, data_path=values.get("data.path"), flagged=int(lr >= 3e-2),
                                 warmup=warmup)
    return launch


def test_the_dry_run_prints_every_stage_before_anything_exists(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(se, "RUNS", tmp_path)
    monkeypatch.setattr(se, "clean_data", lambda overrides, build: CLEAN)
    assert se.main(["--dry-run", "--set", "trainer.precision=fp32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    plants = [line for line in lines if "plant_spikes.py" in line]
    assert len(plants) == len(SPIKES.seeds) and plants[0] == (
        f"python tools/plant_spikes.py --data CACHE/train --output {tmp_path}/spikes/data/seed1 --seed 1 "
        "--global-batch 16 --start 140 --steps 10 --kind random")
    trains = [line for line in lines if "pretrain/main.py" in line]
    assert trains[0] == ("python pretrain/main.py -m hydra/launcher=local hydra.launcher.n_jobs=2 "
                         "+experiment=spikes_none seed=100,101 optim.lr=0.01,0.03,0.1 "
                         f"hydra.sweep.dir={tmp_path}/spikes/tuning trainer.precision=fp32")
    assert "+experiment=spikes_none,spikes_skip,spikes_rewind seed=1,2,3,4,5,6 hydra.sweep.dir" in trains[1]
    assert "optim.lr=RATE" in trains[2] and len(trains) == 3 + len(SPIKES.seeds)
    assert f"seed=1 data.path={tmp_path}/spikes/data/seed1 data.val_path=CACHE/val" in trains[3]
    assert lines[-1].startswith("python tools/experiments/spike_report.py")
    assert not (tmp_path / "spikes").exists()


def test_the_stages_launch_what_is_missing_and_skip_what_finished(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(se, "RUNS", tmp_path)
    monkeypatch.setattr(se, "clean_data", lambda overrides, build: CLEAN)
    launched = []
    monkeypatch.setattr(se, "launch", _fake_launch(launched))
    assert se.main(["--stage", "runs"]) == 2  # nothing planted yet: one line
    assert "run --stage plant first" in capsys.readouterr().err
    assert se.main(["--stage", "plant", "tune", "runs"]) == 0
    assert [a[0] for a in launched[:6]] == ["tools/plant_spikes.py"] * 6
    tune, clean, high, *planted = launched[6:]
    assert "optim.lr=0.01,0.03,0.1" in tune and "optim.lr=0.03" in high  # the lowest rate that spiked on both seeds
    assert len(planted) == len(SPIKES.seeds) and "hydra.launcher.n_jobs=2" in planted[0]
    runs = spike_report.load_runs(tmp_path / "spikes" / "planted")
    assert {(spike_report.fault(r.config), r.seed) for r in runs} == {("planted rows", s) for s in SPIKES.seeds}
    launched.clear()
    assert se.main(["--stage", "plant", "tune", "runs"]) == 0 and launched == []
    out = capsys.readouterr().out
    assert out.count("every run has finished; skipped") == 3
    # one run missing (a stopped multirun): only its multirun runs again
    shutil.rmtree(tmp_path / "spikes" / "planted" / "spikes_skip" / "lr0.003-seed4")
    assert se.main(["--stage", "runs"]) == 0
    assert len(launched) == 1 and "seed=4" in launched[0]


def test_the_runs_refuse_a_set_that_replaces_the_clean_data():
    with pytest.raises(se.ExperimentError, match="leave them unset"):
        se.clean_data(("data.path=/some/where",), build=False)


def test_the_ramp_tunes_and_runs_its_high_rate_only(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(se, "RUNS", tmp_path)
    monkeypatch.setattr(se, "clean_data", lambda overrides, build: pytest.fail("the ramp reads no planted data"))
    ramp, sweep = ["--design", "spikes_ramp"], "python pretrain/main.py -m hydra/launcher=local hydra.launcher.n_jobs=2"
    assert se.main([*ramp, "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{sweep} +experiment=spikes_none seed=100,101 lr.warmup_steps=100 optim.lr=0.5,1,2 "
        f"hydra.sweep.dir={tmp_path}/spikes_ramp/tuning",
        f"{sweep} +experiment=spikes_none,spikes_skip,spikes_rewind seed=1,2,3,4,5,6 lr.warmup_steps=100 "
        f"optim.lr=RATE hydra.sweep.dir={tmp_path}/spikes_ramp/high_lr",
        f"python tools/experiments/spike_report.py {tmp_path}/spikes_ramp/high_lr {tmp_path}/spikes_ramp/tuning "
        "--design spikes_ramp --out docs/results --name spikes_ramp"]
    assert se.main([*ramp, "--stage", "plant"]) == 2  # it plants nothing: one line
    assert "spikes_ramp has no stage plant" in capsys.readouterr().err
    launched = []
    monkeypatch.setattr(se, "launch", _fake_launch(launched))
    assert se.main([*ramp, "--stage", "tune", "runs"]) == 0
    assert len(launched) == 2 and "optim.lr=0.5" in launched[1]  # the lowest peak that spiked on both seeds
    runs = spike_report.load_runs(tmp_path / "spikes_ramp" / "high_lr")
    assert len(runs) == 3 * len(SPIKES_RAMP.seeds) and {r.config["lr"]["warmup_steps"] for r in runs} == {100}
    assert not (tmp_path / "spikes").exists()
