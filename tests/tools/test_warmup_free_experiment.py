"""tools/experiments/warmup_free_experiment.py: the multiruns of docs/results/warmup_free.md, the choice taken
from the tuning runs or given, finished stages skipped (no training)."""

from __future__ import annotations

import json

import pytest

from tools.experiments import warmup_free_experiment as wf


def _run(folder, preset: str, seed: int, lr: float, warmup: int = 0, tau: float | None = None, val: float = 4.0):
    """A finished run folder as the presets' runs write it (the config keys the driver and report read)."""
    folder.mkdir(parents=True)
    config = {"name": preset, "seed": seed, "lr": {"warmup_steps": warmup},
              "optim": {"lr": lr, "quack": False, "spectral": {"enabled": tau is not None, "tau": tau or 0.05}}}
    (folder / "run_info.json").write_text(json.dumps({"config": config}))
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 300, "loss": 4.0, "val_loss": val}) + "\n")
    (folder / "result.json").write_text(json.dumps({"status": "completed"}))


def test_the_dry_run_prints_the_pages_multiruns_and_waits_for_the_choice(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(wf, "RUNS", tmp_path)
    assert wf.main(["--dry-run", "--stage", "tune", "reported"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("python pretrain/main.py -m hydra/launcher=local hydra.launcher.n_jobs=2 "
                               "+experiment=warmup_free_adamw_warmup lr.warmup_steps=0,30,60,120 optim.lr=0.01 "
                               "seed=100")
    assert "optim.spectral.tau=0.02,0.05,0.1,0.2" in lines[1] and "optim.lr=0.03,0.1" in lines[2]
    assert lines[3].startswith("reported: the tuning runs below") and "run --stage tune first" in lines[3]
    # the GPU's call: the CPU's choices given, its rates and seeds, --set last and winning over COMMON
    assert wf.main(["--dry-run", "--stage", "reported", "--warmup", "120", "--tau", "0.05", "--lrs", "1e-2", "3e-2",
                    "--set", "trainer.eval_interval=300", "trainer.compile=false"]) == 0
    adamw, spectral = capsys.readouterr().out.splitlines()  # no probe at 1e-3 off the page's grid
    assert "lr.warmup_steps=0,120 optim.lr=0.01,0.03 seed=1,2,3" in adamw and "optim.spectral.tau=0.05" in spectral
    assert adamw.endswith("logging.tensorboard=false trainer.eval_interval=300 trainer.compile=false")
    assert "trainer.eval_interval=100" not in adamw
    with pytest.raises(SystemExit):
        wf.main(["--warmup", "120"])  # without --tau


def test_the_reported_stage_takes_the_choice_of_the_tuning_runs_and_skips_what_finished(tmp_path, monkeypatch):
    monkeypatch.setattr(wf, "RUNS", tmp_path)
    launched = []
    monkeypatch.setattr(wf, "launch", launched.append)
    for i, sweep in enumerate(wf.tune_sweeps(1e-2)):
        for point in sorted(sweep.points()):
            preset, value, lr, seed = point
            spectral = preset == wf.SPECTRAL
            val = 4.0 - (value if spectral else value / 1000) + i  # longest warmup, largest τ win
            _run(tmp_path / "tuning" / "-".join(map(str, point)), preset, seed, lr, 0 if spectral else value,
                 value if spectral else None, val)
    assert wf.chosen(1e-2) == (120, 0.2)
    assert wf.main(["--stage", "tune", "reported", "--lrs", "1e-2", "--seeds", "1"]) == 0  # tune finished: skipped
    assert launched == [s.argv(2, tmp_path / "reported") for s in wf.reported_sweeps(120, 0.2, (1e-2,), (1,))]
    for sweep in wf.reported_sweeps(120, 0.2, (1e-2,), (1,)):
        for preset, value, lr, seed in sweep.points():
            _run(tmp_path / "reported" / f"{preset}-{value}", preset, seed, lr, *((0, value) if preset == wf.SPECTRAL
                                                                                  else (value,)))
    launched.clear()
    assert wf.main(["--stage", "reported", "--lrs", "1e-2", "--seeds", "1"]) == 0 and launched == []
