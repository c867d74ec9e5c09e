"""tools/experiments/attention_experiment.py and its preset: the arms at one parameter count, the stage
commands (--dry-run), the rates for the compare stage taken from the tuning runs, skipped stages (no training)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tests.helpers import ROOT
from tools.experiments import attention_experiment as exp

ARMS = sorted(p.stem for p in (ROOT / "conf" / "attention_d128").glob("*.yaml"))


def _cfg(arm: str, *overrides: str):
    from pretrain.config import compose_config

    return compose_config(["+experiment=attention_d128", f"+attention_d128={arm}", *overrides])


def test_every_type_has_an_arm_at_head_dim_128_and_mla_has_qk_norm():
    assert ARMS == sorted(exp.TYPES)
    for arm in ARMS:
        cfg = _cfg(arm)
        assert (cfg.attention.type, cfg.model.kv_channels, cfg.model.heads, cfg.model.hidden_size) == (arm, 128, 4, 512)
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
    folders = set()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for arm in ARMS:
            cfg = compose("config", overrides=["+experiment=attention_d128", f"+attention_d128={arm}", "optim.lr=0.001",
                                               "seed=100"], return_hydra_config=True)
            folders.add(cfg.hydra.sweep.subdir)
            assert cfg.hydra.sweep.dir == str(exp.RUNS)
    assert len(folders) == len(ARMS)


def test_the_tune_stage_is_one_multirun_of_every_type_and_rate_on_the_tuning_seed():
    (argv,) = exp.tune_argvs(jobs=2)
    assert argv[:4] == ["pretrain/main.py", "-m", "hydra/launcher=local", "hydra.launcher.n_jobs=2"]
    assert "+experiment=attention_d128" in argv and "+attention_d128=mha,gqa,mqa,gta,gla,mla" in argv
    assert "optim.lr=0.0005,0.001,0.002" in argv and "seed=100" in argv and "hydra.sweep.dir=runs/attention_d128/tune" in argv
    from tools.experiments.seeds import REPORTED_SEEDS, TUNING_SEEDS

    assert exp.TUNING_SEED in TUNING_SEEDS and all(s in REPORTED_SEEDS for s in exp.SEEDS) and len(exp.LRS) == 3


def test_the_compare_stage_groups_the_types_by_their_chosen_rate():
    argvs = exp.compare_argvs(2, {"gla": 5e-4, "gqa": 1e-3, "mla": 1e-3, "gta": 2e-3})
    assert [(a[5], a[6]) for a in argvs] == [("+attention_d128=gla", "optim.lr=0.0005"),
                                            ("+attention_d128=gqa,mla", "optim.lr=0.001"),
                                            ("+attention_d128=gta", "optim.lr=0.002")]
    assert all("seed=1,2,3" in a and "hydra.sweep.dir=runs/attention_d128/compare" in a for a in argvs)


def _run(folder, arm: str, seed: int, lr: float, val: float | None, status: str = "completed") -> None:
    cfg = _cfg(arm, f"seed={seed}", f"optim.lr={lr}")
    folder.mkdir(parents=True)
    (folder / "run_info.json").write_text(json.dumps({"config": dataclasses.asdict(cfg)}))
    (folder / "result.json").write_text(json.dumps({"status": status}))
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 150, "loss": 5.0, "grad_norm": 2.0, "val_loss": val}))


def _tune(root, losses: dict[str, tuple]) -> None:
    for arm, per_lr in losses.items():
        for lr, val in zip(exp.LRS, per_lr):
            _run(root / "tune" / f"{arm}-{lr}", arm, exp.TUNING_SEED, lr, val, "diverged" if val is None else "completed")


def test_the_compare_stage_takes_its_rates_from_the_tuning_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(exp, "RUNS", tmp_path)
    assert exp.main(["--stage", "compare", "--dry-run"]) == 0  # no tuning runs yet: said, nothing launched
    assert "no tuning runs below" in capsys.readouterr().out
    _tune(tmp_path, {arm: (5.0, 4.9, 4.8 if arm == "gta" else 5.1) for arm in exp.TYPES if arm != "mla"})
    _tune(tmp_path, {"mla": (5.0, 4.9, None)})  # diverged at 2e-3
    assert exp.chosen_lrs() == {"mha": 1e-3, "gqa": 1e-3, "mqa": 1e-3, "gta": 2e-3, "gla": 1e-3, "mla": 1e-3}
    assert exp.main(["--stage", "compare", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "+attention_d128=mha,gqa,mqa,gla,mla optim.lr=0.001 seed=1,2,3" in lines[0]
    assert "+attention_d128=gta optim.lr=0.002" in lines[1]
    assert exp.main(["--stage", "report-choice"]) == 0
    choice = json.loads((tmp_path / "choice.json").read_text())
    assert choice["choice"]["gta"]["at_edge"] and choice["choice"]["mla+qk-norm"]["chosen_lr"] == 1e-3


def test_a_type_without_a_rate_stops_the_compare_stage_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(exp, "RUNS", tmp_path)
    _tune(tmp_path, {arm: (5.0, 4.9, 5.1) for arm in exp.TYPES if arm != "gla"})
    _tune(tmp_path, {"gla": (None, None, None)})
    assert exp.main(["--stage", "compare"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no rate chosen for gla" in err


def test_a_stage_whose_runs_finished_is_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(exp, "RUNS", tmp_path)
    launched = []
    monkeypatch.setattr(exp, "launch", launched.append)
    _tune(tmp_path, {arm: (5.0, 4.9, 5.1) for arm in exp.TYPES if arm != "gla"})
    exp.stage_training("tune", jobs=2, dry=False, force=False)  # GLA's runs are missing: the multirun runs
    assert launched == exp.tune_argvs(2)
    _tune(tmp_path, {"gla": (5.0, None, 5.1)})  # a diverged run has finished too
    launched.clear()
    exp.stage_training("tune", jobs=2, dry=False, force=False)
    assert launched == [] and "tune: every run has finished; skipped" in capsys.readouterr().out


def test_dry_run_prints_every_stage_and_runs_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(exp, "RUNS", tmp_path)
    monkeypatch.setattr(exp, "launch", lambda argv: pytest.fail(f"launched {argv}"))
    assert exp.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("python pretrain/main.py -m hydra/launcher=local hydra.launcher.n_jobs=2")
    assert "(report-choice)" in out and "python tools/experiments/attention_report.py" in out
    assert not any(tmp_path.iterdir())
