"""tools/experiments/attention_experiment.py and its preset: the arms at one parameter count, the stage
commands (--dry-run), the rates for the compare stage taken from the tuning runs, skipped stages (no training)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import pytest

from models.attention import attention_names
from tests.helpers import ROOT
from tools.experiments import attention_experiment as exp
from tools.experiments.preregistration import ATTENTION_LONG, MAX_EXTENSIONS

ARMS = sorted(p.stem for p in (ROOT / "conf" / "attention_d128").glob("*.yaml"))
D128 = exp.D128


def _cfg(arm: str, *overrides: str, preset: str = "attention_d128"):
    from pretrain.config import compose_config

    return compose_config([f"+experiment={preset}", f"+attention_d128={arm}", *overrides])


def test_every_type_has_an_arm_at_head_dim_128_and_mla_has_qk_norm():
    assert [a for a in ARMS if a in attention_names()] == sorted(exp.TYPES) and set(ATTENTION_LONG.arms) <= set(ARMS)
    for arm in ARMS:
        cfg = _cfg(arm)
        assert (cfg.attention.type, cfg.model.kv_channels, cfg.model.heads, cfg.model.hidden_size) == (
            arm.removesuffix("_plain"), 128, 4, 512)
        assert cfg.attention.qk_norm == (arm == "mla") and cfg.trainer.threads == 1
    assert _cfg("gqa").attention.query_groups(4) == 2 and _cfg("gta").attention.shape(128) == {"rope_dim": 64}
    assert _cfg("gla").attention.shape(128) == {"num_latents": 2, "latent_dim": 256, "rope_dim": 64, "q_lora_rank": 512}
    assert _cfg("mla").attention.shape(128)["latent_dim"] == 512


def test_the_arms_have_mla_s_parameter_count(megatron_world):
    """Each FFN width gives its type MLA's parameter count: within one FFN unit (3 x D x layers parameters)."""
    from models.inference import build_for_decode

    counts = {}
    for arm in ARMS:
        cfg = _cfg(arm)
        counts[arm] = sum(p.numel() for p in build_for_decode(cfg.model, cfg.attention, cfg.data.vocab_size).parameters())
    unit = 3 * 512 * 2
    assert all(abs(n - counts["mla"]) <= unit / 2 for n in counts.values()), counts
    assert counts["mla"] > 11e6


def test_the_sweep_points_land_in_their_own_folders():
    from hydra import compose, initialize_config_dir

    from pretrain.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for design in exp.DESIGNS.values():
            folders = set()
            for arm in design.arms:
                cfg = compose("config", overrides=[f"+experiment={design.preset}", f"+attention_d128={arm}",
                                                   "optim.lr=0.001", "seed=100"], return_hydra_config=True)
                folders.add(cfg.hydra.sweep.subdir)
                assert cfg.hydra.sweep.dir == str(exp.folder(design)) and cfg.trainer.max_steps == design.steps
            assert len(folders) == len(design.arms)


def test_the_tune_stage_is_one_multirun_of_every_type_and_rate_on_the_tuning_seed():
    (argv,) = exp.tune_argvs(D128, jobs=2)
    assert argv[:4] == ["pretrain/main.py", "-m", "hydra/launcher=local", "hydra.launcher.n_jobs=2"]
    assert "+experiment=attention_d128" in argv and "+attention_d128=mha,gqa,mqa,gta,gla,mla" in argv
    assert "optim.lr=0.0005,0.001,0.002" in argv and "seed=100" in argv and "hydra.sweep.dir=runs/attention_d128/tune" in argv
    from tools.experiments.seeds import REPORTED_SEEDS, TUNING_SEEDS

    assert D128.tuning_seeds == (100,) and D128.seeds == (1, 2, 3) and len(D128.lrs) == 3
    for design in exp.DESIGNS.values():
        assert all(s in TUNING_SEEDS for s in design.tuning_seeds) and all(s in REPORTED_SEEDS for s in design.seeds)


def test_the_compare_stage_groups_the_types_by_their_chosen_rate():
    argvs = exp.compare_argvs(D128, 2, {"gla": 5e-4, "gqa": 1e-3, "mla": 1e-3, "gta": 2e-3})
    assert [(a[5], a[6]) for a in argvs] == [("+attention_d128=gla", "optim.lr=0.0005"),
                                            ("+attention_d128=gqa,mla", "optim.lr=0.001"),
                                            ("+attention_d128=gta", "optim.lr=0.002")]
    assert all("seed=1,2,3" in a and "hydra.sweep.dir=runs/attention_d128/compare" in a for a in argvs)


@functools.cache
def _config(arm: str, preset: str) -> str:
    """An arm's resolved config as JSON, composed once (a run differs only in its seed and rate)."""
    return json.dumps(dataclasses.asdict(_cfg(arm, preset=preset)))


def _run(folder, arm: str, seed: int, lr: float, val: float | None, status: str = "completed",
         preset: str = "attention_d128") -> None:
    config = json.loads(_config(arm, preset)) | {"seed": seed}
    config["optim"]["lr"] = lr
    folder.mkdir(parents=True)
    (folder / "run_info.json").write_text(json.dumps({"config": config}))
    (folder / "result.json").write_text(json.dumps({"status": status}))
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 150, "loss": 5.0, "grad_norm": 2.0, "val_loss": val}))


def _tune(root, losses: dict[str, tuple]) -> None:
    for arm, per_lr in losses.items():
        for lr, val in zip(D128.lrs, per_lr):
            _run(root / "tune" / f"{arm}-{lr}", arm, 100, lr, val, "diverged" if val is None else "completed")


def test_the_compare_stage_takes_its_rates_from_the_tuning_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(exp, "RUNS", tmp_path)
    assert exp.main(["--stage", "compare", "--dry-run"]) == 0  # no tuning runs yet: said, nothing launched
    assert "no tuning runs below" in capsys.readouterr().out
    _tune(tmp_path / "attention_d128",
          {arm: (5.0, 4.9, 4.8 if arm == "gta" else 5.1) for arm in exp.TYPES if arm != "mla"})
    _tune(tmp_path / "attention_d128", {"mla": (5.0, 4.9, None)})  # diverged at 2e-3
    with pytest.raises(exp.ExperimentError, match="have not all finished"):  # GTA chose the grid's top: 4e-3 next
        exp.chosen_lrs()
    _run(tmp_path / "attention_d128" / "tune" / "gta-0.004", "gta", 100, 4e-3, 4.85)
    assert exp.chosen_lrs() == {"mha": 1e-3, "gqa": 1e-3, "mqa": 1e-3, "gta": 2e-3, "gla": 1e-3, "mla": 1e-3}
    assert exp.main(["--stage", "compare", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "+attention_d128=mha,gqa,mqa,gla,mla optim.lr=0.001 seed=1,2,3" in lines[0]
    assert "+attention_d128=gta optim.lr=0.002" in lines[1]
    assert exp.main(["--stage", "report-choice"]) == 0
    choice = json.loads((tmp_path / "attention_d128" / "choice.json").read_text())
    assert choice["choice"]["gta"]["lrs"] == [5e-4, 1e-3, 2e-3, 4e-3] and not choice["choice"]["gta"]["at_edge"]
    assert choice["choice"]["mla+qk-norm"]["chosen_lr"] == 1e-3


def test_a_type_without_a_rate_stops_the_compare_stage_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(exp, "RUNS", tmp_path)
    _tune(tmp_path / "attention_d128", {arm: (5.0, 4.9, 5.1) for arm in exp.TYPES if arm != "gla"})
    _tune(tmp_path / "attention_d128", {"gla": (None, None, None)})
    assert exp.main(["--stage", "compare"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no rate chosen for gla" in err


def test_a_stage_whose_runs_finished_is_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(exp, "RUNS", tmp_path)
    root, launched = tmp_path / "attention_d128", []
    _tune(root, {arm: (5.0, 4.9, 5.1) for arm in exp.TYPES if arm != "gla"})

    def launch(argv):  # the multirun makes GLA's missing runs, one of them diverged (finished too)
        launched.append(argv)
        _tune(root, {"gla": (5.0, 4.9, None)})

    monkeypatch.setattr(exp, "launch", launch)
    exp.stage_tune(D128, jobs=2, dry=False, force=False)  # GLA's runs are missing: its multirun runs
    assert launched == exp.tune_argvs(D128, 2, {"gla": D128.lrs})
    launched.clear()
    exp.stage_tune(D128, jobs=2, dry=False, force=False)
    assert launched == [] and "tune: every run has finished; skipped" in capsys.readouterr().out


def _multirun(root, preset: str, loss):
    """A stand-in for a tuning multirun: a finished run for each (arm, lr, seed) of its argv, loss(arm, lr)."""
    def launch(argv):
        values = dict(a.split("=", 1) for a in argv if "=" in a)
        for arm in values["+attention_d128"].split(","):
            for lr in map(float, values["optim.lr"].split(",")):
                for seed in map(int, values["seed"].split(",")):
                    if not (folder := root / "tune" / f"{arm}-{lr:g}-{seed}").exists():  # a finished run ends at once
                        _run(folder, arm, seed, lr, loss(arm, lr), preset=preset)
    return launch


def test_a_choice_on_the_grid_s_edge_extends_the_grid_round_by_round(tmp_path, monkeypatch, capsys):
    """GTA's best rate is the grid's top, then lies inside once 4e-3 ran; plain MLA's keeps falling below the
    grid: two rounds past its low edge, then it stops (MAX_EXTENSIONS) with its choice still on the edge."""
    monkeypatch.setattr(exp, "RUNS", tmp_path)
    best = {"gta": 2.5e-3, "mla_plain": 1e-5}  # the others' best rate, 1e-3, lies inside the grid
    launched = []
    fake = _multirun(tmp_path / "attention_d128_long", "attention_d128_long",
                     lambda arm, lr: 4.0 + abs(math.log(lr / best.get(arm, 1e-3))))
    monkeypatch.setattr(exp, "launch", lambda argv: (launched.append(argv), fake(argv)))
    assert exp.main(["--design", "long", "--stage", "tune"]) == 0
    rounds = [(a[5].split("=")[1], a[6].split("=")[1], a[7]) for a in launched]
    assert rounds[0] == ("gqa,gta,gla,mla,mla_plain", "0.0005,0.001,0.002", "seed=100,101")
    assert ("gta", "0.0005,0.001,0.002,0.004", "seed=100,101") in rounds
    assert rounds[-1] == ("mla_plain", "0.000125,0.00025,0.0005,0.001,0.002", "seed=100,101")
    assert len(rounds) == 1 + MAX_EXTENSIONS + 1  # the first round, plain MLA's rounds, GTA's beside plain MLA's first
    grids = exp.tuning_grids(ATTENTION_LONG, exp.finished(tmp_path / "attention_d128_long" / "tune"))
    assert grids["gta"] == (5e-4, 1e-3, 2e-3, 4e-3) and grids["gqa"] == ATTENTION_LONG.lrs
    assert exp.chosen_lrs(ATTENTION_LONG)["mla_plain"] == 1.25e-4
    launched.clear()
    assert exp.main(["--design", "long", "--stage", "tune", "report-choice"]) == 0 and launched == []
    choice = json.loads((tmp_path / "attention_d128_long" / "choice.json").read_text())["choice"]
    assert choice["mla"]["at_edge"] and not choice["gta"]["at_edge"] and not choice["mla+qk-norm"]["at_edge"]
    assert "every run has finished; skipped" in capsys.readouterr().out


def test_dry_run_prints_every_stage_and_runs_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(exp, "RUNS", tmp_path)
    monkeypatch.setattr(exp, "launch", lambda argv: pytest.fail(f"launched {argv}"))
    assert exp.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("python pretrain/main.py -m hydra/launcher=local hydra.launcher.n_jobs=2")
    assert "(report-choice)" in out and "python tools/experiments/attention_report.py" in out
    assert exp.main(["--dry-run", "--design", "long"]) == 0
    out = capsys.readouterr().out
    assert "+experiment=attention_d128_long +attention_d128=gqa,gta,gla,mla,mla_plain optim.lr=0.0005,0.001,0.002 " \
           "seed=100,101 hydra.sweep.dir=runs/attention_d128_long/tune" in out.replace(str(tmp_path), "runs")
    assert "--name attention_d128_long" in out
    assert not any(tmp_path.iterdir())
