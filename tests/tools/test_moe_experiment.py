"""tools/experiments/moe_experiment.py: settings from the presets, the stage commands, the dry run, β = γ
taken from the tuning runs, skipped stages and one-line errors (no training)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tests.helpers import ROOT
from tools.experiments import moe_experiment as moe


@pytest.fixture(scope="module")
def setup() -> moe.Setup:
    return moe.setup()


def test_settings_and_packed_sets_come_from_the_presets(setup):
    from pretrain.config import compose_config

    pre = compose_config(["+experiment=moe_pretrain"])
    cont = compose_config(["+experiment=moe_continue", "seed=2"])
    assert str(setup.pretrain_dir) == pre.run_dir == cont.init_from
    assert setup.val_rows == pre.trainer.eval_batches * pre.trainer.global_batch_size
    sets = {str(p): v for p, v in moe.packed_sets(setup).items()}
    assert sets == {pre.data.sources[0].path: ("code", "train"), pre.data.sources[1].path: ("tests", "train"),
                    pre.data.val_sets[0].path: ("code", "val"), pre.data.val_sets[1].path: ("tests", "val"),
                    pre.data.val_path: ("all", "val")}
    assert [(s.name, s.weight) for s in pre.data.sources] == [("code", 0.5), ("tests", 0.5)]


def test_the_continued_runs_are_the_pretrained_model_on_the_same_data():
    from pretrain.config import compose_config

    pre = compose_config(["+experiment=moe_pretrain"])
    cont = compose_config(["+experiment=moe_continue", "model.moe.ortho_loss=0.1", "model.moe.var_loss=0.1"])
    assert dataclasses.replace(cont.model, moe=pre.model.moe) == pre.model and cont.data == pre.data
    assert (pre.model.moe.ortho_loss, pre.model.moe.var_loss) == (0.0, 0.0) and pre.model.moe.num_experts == 8
    assert (cont.model.moe.ortho_loss, cont.model.moe.var_loss) == (0.1, 0.1)
    assert pre.trainer.max_steps > 300  # longer than the first, from-scratch runs (200 steps)
    for cfg in (pre, cont):  # each source's set scores at least 128k tokens per evaluation
        assert cfg.trainer.eval_batches * cfg.trainer.global_batch_size * cfg.data.seq_len >= 128 * 1024


def test_the_dry_run_prints_every_stage_in_order_and_runs_nothing(monkeypatch, capsys):
    monkeypatch.setattr(moe, "launch", lambda argv: pytest.fail(f"launched {argv}"))
    assert moe.main(["--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    packs = [line for line in lines if line.startswith("(packed set)")]
    assert len(packs) == 5 and "stdlib:code:train" in packs[0] and "stdlib:all:val" in packs[-1]
    runs = [line for line in lines if line.startswith("python pretrain/main.py")]
    assert runs[0] == "python pretrain/main.py +experiment=moe_pretrain"
    tune = runs[1:4]
    assert [t.split(" model.moe.ortho_loss=")[1].split()[0] for t in tune] == ["0.01", "0.1", "1"]
    assert all("model.moe.var_loss=" + t.split("ortho_loss=")[1].split()[0] in t and "seed=100,101" in t
               and "hydra.sweep.dir=runs/moe_continue/tune" in t and "hydra/launcher=local" in t for t in tune)
    assert "model.moe.ortho_loss=0 model.moe.var_loss=0 seed=1,2,3 hydra.sweep.dir=runs/moe_continue/arms" in runs[4]
    assert any(line.startswith("continue: and the chosen β = γ") and "run --stage tune first" in line
               for line in lines)
    assert lines[-1] == ("python tools/experiments/moe_report.py runs/moe_continue --pretrained runs/moe_pretrain "
                         "--out docs/results --name moe")


def _run(folder, seed: int, beta: float, val: float, status: str = "completed") -> None:
    folder.mkdir(parents=True)
    moe_cfg = {"num_experts": 8, "ortho_loss": beta, "var_loss": beta}
    (folder / "run_info.json").write_text(json.dumps({"config": {"seed": seed, "model": {"moe": moe_cfg}}}))
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 500, "loss": 4.0, "val_loss": val}) + "\n")
    (folder / "result.json").write_text(json.dumps({"status": status}))


def _pretrained(folder) -> None:
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({"status": "completed"}))


def test_the_continue_stage_takes_beta_from_the_tuning_runs(setup, tmp_path, monkeypatch):
    s = dataclasses.replace(setup, pretrain_dir=tmp_path / "pre", continue_dir=tmp_path / "cont")
    _pretrained(s.pretrain_dir)
    for seed in moe.TUNING_SEEDS:  # β = 1 would win on seed 100 alone
        for beta, val in zip(moe.BETAS, (4.3, 4.2, 4.0)):
            if (beta, seed) != (1.0, 101):
                _run(s.tune_dir / f"b{beta}-{seed}", seed, beta, val)
    with pytest.raises(moe.ExperimentError, match="1 of the 6 tuning runs .* have not finished"):
        moe.chosen(s)
    _run(s.tune_dir / "b1.0-101", 101, 1.0, 3.0, "diverged")  # finished; β = 1 is out, not chosen on one seed
    assert moe.chosen(s) == (0.1, 0.1)
    launched = []
    monkeypatch.setattr(moe, "launch", launched.append)
    moe.stage_training("tune", s, jobs=2, dry=False, force=False)  # every tuning run completed: skipped
    moe.stage_training("continue", s, jobs=2, dry=False, force=False)
    assert launched == [moe.continue_argv((0.0, 0.0), moe.SEEDS, s.arms_dir, 2),
                        moe.continue_argv((0.1, 0.1), moe.SEEDS, s.arms_dir, 2)]
    for seed in moe.SEEDS:
        for beta in (0.0, 0.1):
            _run(s.arms_dir / f"{beta}-{seed}", seed, beta, 4.0)
    launched.clear()
    moe.stage_training("continue", s, jobs=2, dry=False, force=False)
    assert launched == []  # both arms completed on every reported seed


def test_beta_from_an_earlier_report_is_taken_as_chosen_and_a_bad_one_is_one_line(setup, tmp_path, capsys):
    """tools/gpu_check.py 44 continues at the β = γ docs/results/moe.json's tuning chose, tuning nothing again."""
    s = dataclasses.replace(setup, pretrain_dir=tmp_path / "pre", continue_dir=tmp_path / "cont",
                            beta_from=ROOT / "docs" / "results" / "moe.json")
    tuning = json.loads(s.beta_from.read_text())["tuning"]
    assert moe.chosen(s) == (tuning["ortho_loss"], tuning["var_loss"])  # no tuning run below tmp_path
    assert moe.training_stages(s, 3)["continue"].argvs()[1] == moe.continue_argv(moe.chosen(s), moe.SEEDS,
                                                                                  s.arms_dir, 3)
    assert not any("/tune" in c for c in moe.commands(s, 3))  # what ran: no tuning stage
    (tmp_path / "bad.json").write_text(json.dumps({"tuning": {"ortho_loss": 0.1, "var_loss": 1.0}}))
    assert moe.main(["--stage", "continue", "--beta-from", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "its tuning chose β = 0.1 and γ = 1" in err


def test_training_without_the_pretrained_run_is_one_line(setup, tmp_path, monkeypatch, capsys):
    s = dataclasses.replace(setup, pretrain_dir=tmp_path / "missing", continue_dir=tmp_path / "cont")
    monkeypatch.setattr(moe, "setup", lambda overrides: s)
    monkeypatch.setattr(moe, "launch", lambda argv: pytest.fail(f"launched {argv}"))
    assert moe.main(["--stage", "tune"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{s.pretrain_dir} holds no completed pretraining run" in err
    assert "run --stage pretrain first" in err


def test_a_validation_set_smaller_than_one_evaluation_is_one_clear_error(setup, tmp_path):
    sets = {}
    for name in ("code-train", "tests-train", "code-val", "tests-val", "all-val"):
        sets[name] = tmp_path / name
        rows = 100 if name == "tests-val" else 10_000
        (tmp_path / f"{name}.json").write_text(json.dumps({"stats": {"rows": rows}}))
    data = dataclasses.replace(setup.data, val_path=str(sets["all-val"]), sources=[
        dataclasses.replace(src, path=str(sets[f"{src.name}-train"])) for src in setup.data.sources], val_sets=[
        dataclasses.replace(v, path=str(sets[f"{v.name}-val"])) for v in setup.data.val_sets])
    with pytest.raises(moe.ExperimentError, match=r"tests-val holds 100 rows, fewer than the 1024 .* raise "
                                                   r"data.val_percent"):
        moe.check_validation_rows(dataclasses.replace(setup, data=data))


def test_set_overrides_reach_the_packed_sets_and_a_set_split_otherwise_is_refused(setup, tmp_path, monkeypatch,
                                                                                  capsys):
    gpu = moe.setup(("data.val_percent=30", "trainer.eval_batches=512"))  # what tools/gpu_check.sh 44 passes
    assert (gpu.data.val_percent, gpu.val_rows) == (30.0, 512 * 16)
    sources = [dataclasses.replace(src, path=str(tmp_path / src.name)) for src in gpu.data.sources]
    data = dataclasses.replace(gpu.data, sources=sources, val_sets=[], val_path=str(tmp_path / "all-val"))
    for prefix in (*(src.path for src in sources), data.val_path):  # packed on the CPU, 10% held out
        source = {"inputs": ["stdlib:code:train"], "val_percent": 10.0}
        (tmp_path / f"{prefix}.json").write_text(json.dumps({"stats": {"rows": 10_000}, "source": source}))
    monkeypatch.setattr(moe, "setup", lambda overrides: dataclasses.replace(gpu, data=data))
    monkeypatch.setattr(moe, "launch", lambda argv: pytest.fail(f"launched {argv}"))
    assert moe.main(["--stage", "pack", "--set", "data.val_percent=30"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was packed with 10.0% of the files held out, but data.val_percent is 30" in err
    assert "rerun --stage pack --force" in err


def test_the_report_stage_writes_the_results_json(setup, tmp_path, capsys, committed_checkout):
    from tests.tools.test_moe_report import fake_run

    s = dataclasses.replace(setup, pretrain_dir=tmp_path / "pre", continue_dir=tmp_path / "cont")
    fake_run(s.pretrain_dir, 1234, val=5.5)
    for seed in moe.TUNING_SEEDS:
        for beta, val in zip(moe.BETAS, (4.3, 4.2, 4.4)):
            fake_run(s.tune_dir / f"b{beta}-{seed}", seed, beta, beta, val)
    for seed in moe.SEEDS:
        fake_run(s.arms_dir / f"aux-{seed}", seed, val=4.0 + 0.1 * seed)
        fake_run(s.arms_dir / f"spec-{seed}", seed, 0.1, 0.1, val=4.05 + 0.1 * seed, purity=0.7)
    result = moe.stage_report(s, 2, tmp_path / "out", "moe", 0.2, dry=False)
    written = json.loads((tmp_path / "out" / "moe.json").read_text())
    assert written["tuning"]["arm"] == result["tuning"]["arm"] == "aux + ortho (beta=0.1) + var (gamma=0.1)"
    commands = written["provenance"]["experiment_commands"]
    assert commands[0] == "python pretrain/main.py +experiment=moe_pretrain" and len(commands) == 1 + 3 + 2
    assert "model.moe.ortho_loss=0.1 model.moe.var_loss=0.1 seed=1,2,3" in commands[-1]
    assert written["setup"]["reported_seeds"] == [1, 2, 3] and "moe_continue.yaml" in written["setup"]
    assert written["paired_vs_aux_only"]["aux + ortho (beta=0.1) + var (gamma=0.1)"]["val_loss"]["diffs"] == \
        pytest.approx([0.05] * 3)
    assert written["pretrained"]["folder"] == str(s.pretrain_dir)
    assert "purity" in capsys.readouterr().out
