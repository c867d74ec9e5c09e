"""tools/experiments/moe_experiment.py: settings from the presets, the stage commands, the dry run, the grids
centred on the measured magnitudes, β and γ tuned apart (an edge choice extends the grid), the four arms,
skipped stages and one-line errors (no training: launches are recorded or faked)."""

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
    assert sets == {pre.data.sources[0].path: ("code-nodoc", "train"), pre.data.sources[1].path: ("prose", "train"),
                    pre.data.val_sets[0].path: ("code-nodoc", "val"), pre.data.val_sets[1].path: ("prose", "val"),
                    pre.data.val_path: (moe.MIXED, "val")}
    assert [(s.name, s.weight) for s in pre.data.sources] == [("code-nodoc", 0.5), ("prose", 0.5)]
    assert moe.corpus_names(setup, moe.MIXED, "val") == ["stdlib:code-nodoc:val", "stdlib:prose:val"]


def test_the_continued_runs_are_the_pretrained_model_on_the_same_data():
    from pretrain.config import compose_config

    pre = compose_config(["+experiment=moe_pretrain"])
    cont = compose_config(["+experiment=moe_continue", "model.moe.ortho_loss=0.1", "model.moe.var_loss=0.1"])
    assert dataclasses.replace(cont.model, moe=pre.model.moe) == pre.model and cont.data == pre.data
    assert (pre.model.moe.ortho_loss, pre.model.moe.var_loss) == (0.0, 0.0) and pre.model.moe.num_experts == 8
    assert (cont.model.moe.ortho_loss, cont.model.moe.var_loss) == (0.1, 0.1)
    assert pre.trainer.max_steps > 300  # longer than the first, from-scratch runs (200 steps)
    for cfg in (pre, cont):  # each source's set scores at least 64k tokens per evaluation
        assert cfg.trainer.eval_batches * cfg.trainer.global_batch_size * cfg.data.seq_len >= 64 * 1024


def test_the_dry_run_prints_every_stage_in_order_and_runs_nothing(monkeypatch, capsys):
    monkeypatch.setattr(moe, "launch", lambda argv: pytest.fail(f"launched {argv}"))
    assert moe.main(["--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    packs = [line for line in lines if line.startswith("(packed set)")]
    assert len(packs) == 5 and "stdlib:code-nodoc:train" in packs[0]
    assert ("stdlib:code-nodoc:val + stdlib:prose:val (20% of the names held out, interleaved by characters)"
            in packs[-1])
    runs = [line for line in lines if line.startswith("python pretrain/main.py")]
    assert runs[0] == "python pretrain/main.py +experiment=moe_pretrain"
    assert runs[1].startswith("python pretrain/main.py +experiment=moe_continue model.moe.ortho_loss=1e-09 "
                              "model.moe.var_loss=1e-09 seed=199 trainer.max_steps=5 trainer.log_interval=1")
    assert any(line.startswith("tune: each loss alone at 0.25 / 1 / 4 x its centre") and "seeds 100,101" in line
               and "run --stage measure first" in line for line in lines)
    assert ("model.moe.ortho_loss=0 model.moe.var_loss=0 seed=1,2,3,4,5 hydra.sweep.dir=runs/moe_continue/arms"
            in runs[2])
    assert any(line.startswith("continue: and aux + L_o, aux + L_v, aux + both at the chosen β and γ")
               for line in lines)
    assert lines[-1] == ("python tools/experiments/moe_report.py runs/moe_continue --pretrained runs/moe_pretrain "
                         "--out docs/results --name moe")


def _run(folder, seed: int, coeffs: tuple[float, float], val: float, status: str = "completed") -> None:
    folder.mkdir(parents=True)
    moe_cfg = {"num_experts": 8, "ortho_loss": coeffs[0], "var_loss": coeffs[1]}
    (folder / "run_info.json").write_text(json.dumps({"config": {"seed": seed, "model": {"moe": moe_cfg}}}))
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 500, "loss": 4.0, "val_loss": val}) + "\n")
    (folder / "result.json").write_text(json.dumps({"status": status}))


def _pretrained(folder) -> None:
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({"status": "completed"}))


def _measured(folder, lm: float = 4.0, ortho: float = 0.02, var: float = -0.01) -> None:
    """The measuring run: 5 logged steps, L_o and L_v per MoE layer (layers 1 and 2)."""
    from tests.tools.test_moe_report import fake_run

    fake_run(folder, moe.MEASURE_SEED, moe.PROBE, moe.PROBE)  # its provenance as keel records it
    rows = [{"step": k, "loss": lm + 0.01 * (k - 3), **{f"moe/layer{n}/{key}": x for n in (1, 2)
                                                        for key, x in (("ortho_loss", ortho), ("var_loss", var))}}
            for k in range(1, 6)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _fake_launch(launched: list, val) -> callable:
    """A launch that records each multirun and writes its runs as finished, val_loss = val(β, γ)."""
    def launch(argv):
        launched.append(argv)
        words = dict(w.split("=", 1) for w in argv if "=" in w)
        coeffs = float(words["model.moe.ortho_loss"]), float(words["model.moe.var_loss"])
        for seed in map(int, words["seed"].split(",")):
            _run(moe.Path(words["hydra.sweep.dir"]) / f"b{coeffs[0]:g}-g{coeffs[1]:g}-s{seed}", seed, coeffs,
                 val(*coeffs) + 0.001 * seed)
    return launch


def test_the_grids_centre_on_the_measured_magnitudes_and_an_edge_choice_extends_the_grid(setup, tmp_path,
                                                                                          monkeypatch):
    s = dataclasses.replace(setup, pretrain_dir=tmp_path / "pre", continue_dir=tmp_path / "cont")
    _pretrained(s.pretrain_dir)
    with pytest.raises(moe.ExperimentError, match="holds no completed measuring run; run --stage measure first"):
        moe.magnitudes(s)
    _measured(s.measure_dir)
    m = moe.magnitudes(s)
    # L_o and L_v summed over both layers: 0.04 and -0.02; L_LM the mean over the 5 steps, 4.0
    assert m["lm_loss"] == pytest.approx(4.0) and (m["ortho_loss"], m["var_loss"]) == pytest.approx((0.04, -0.02))
    assert m["centres"] == {"ortho_loss": 0.01, "var_loss": 0.2}  # 1e-4 x 4 / 0.04 and 1e-3 x 4 / 0.02
    assert moe.tuning_values(s, "ortho_loss") == ([0.0025, 0.01, 0.04], False)
    # β: best at its centre, inside the grid; γ: the larger the better, so its grid grows x4 twice, then stops
    launched = []
    monkeypatch.setattr(moe, "launch", _fake_launch(launched, lambda b, g: 4.0 + abs(b - 0.01) - 0.001 * g))
    moe.stage_training("tune", s, jobs=2, dry=False, force=False)
    assert [a[5:7] for a in launched] == [[f"model.moe.ortho_loss={b:g}", "model.moe.var_loss=0"]
                                          for b in (0.0025, 0.01, 0.04)] + \
        [["model.moe.ortho_loss=0", f"model.moe.var_loss={g:g}"] for g in (0.05, 0.2, 0.8, 3.2, 13)]
    assert all("seed=100,101" in a and f"hydra.sweep.dir={s.tune_dir}" in a for a in launched)
    assert moe.tuning_values(s, "var_loss") == ([0.05, 0.2, 0.8, 3.2, 13.0], True)
    assert moe.chosen(s) == (0.01, 13.0)
    choice = moe.moe_report.choose(moe.runs_below(s.tune_dir), "var_loss")
    assert choice["at_edge"] and choice["chosen"] == 13.0  # flagged: still at the edge after 2 extensions
    launched.clear()
    moe.stage_training("tune", s, jobs=2, dry=False, force=False)  # every grid final: skipped
    moe.stage_training("continue", s, jobs=2, dry=False, force=False)
    assert launched == [moe.continue_argv(c, moe.SEEDS, s.arms_dir, 2)
                        for c in ((0.0, 0.0), (0.01, 0.0), (0.0, 13.0), (0.01, 13.0))]
    launched.clear()
    moe.stage_training("continue", s, jobs=2, dry=False, force=False)
    assert launched == []  # the four arms completed on every reported seed
    commands = moe.commands(s, 2)
    assert len(commands) == 1 + 1 + 8 + 4 and "seed=199" in commands[1]


def test_a_diverged_tuning_run_counts_as_finished_and_its_value_is_out(setup, tmp_path):
    s = dataclasses.replace(setup, pretrain_dir=tmp_path / "pre", continue_dir=tmp_path / "cont")
    _measured(s.measure_dir)
    for seed in moe.TUNING_SEEDS:
        for b, val in zip((0.0025, 0.01, 0.04), (4.3, 4.2, 4.0)):
            if (b, seed) != (0.04, 101):
                _run(s.tune_dir / f"b{b}-{seed}", seed, (b, 0.0), val)
    assert moe.tuning_values(s, "ortho_loss") == ([0.0025, 0.01, 0.04], False)
    _run(s.tune_dir / "b0.04-101", 101, (0.04, 0.0), 3.0, "diverged")  # finished; 0.04 is out, not chosen
    assert moe.tuning_values(s, "ortho_loss") == ([0.0025, 0.01, 0.04], True)
    assert moe.moe_report.choose(moe.runs_below(s.tune_dir), "ortho_loss")["chosen"] == 0.01
    with pytest.raises(moe.ExperimentError, match="the tuning of var_loss .* has not finished"):
        moe.chosen(s)


def test_coefficients_from_an_earlier_report_are_taken_as_chosen_and_a_bad_one_is_one_line(setup, tmp_path, capsys):
    """tools/gpu_check.sh 44 continues at the β and γ an earlier report's tuning chose, measuring and tuning
    nothing again."""
    report = tmp_path / "moe.json"
    report.write_text(json.dumps({"tuning": {"ortho_loss": {"chosen": 0.01}, "var_loss": {"chosen": 0.3}}}))
    s = dataclasses.replace(setup, pretrain_dir=tmp_path / "pre", continue_dir=tmp_path / "cont", coeffs_from=report)
    assert moe.chosen(s) == (0.01, 0.3)  # no tuning run below tmp_path
    assert moe.training_stages(s, 3)["continue"].argvs()[3] == moe.continue_argv((0.01, 0.3), moe.SEEDS,
                                                                                  s.arms_dir, 3)
    assert not any("/tune" in c or "seed=199" in c for c in moe.commands(s, 3))  # what ran: no measuring, no tuning
    moe.stage_training("tune", s, jobs=2, dry=False, force=False)  # nothing to do, and no pretrained run needed
    assert "tune: β and γ come from" in capsys.readouterr().out
    old = tmp_path / "old.json"  # the previous design's β = γ
    old.write_text(json.dumps({"tuning": {"ortho_loss": 0.01, "var_loss": 0.01}}))
    assert moe.main(["--stage", "continue", "--coeffs-from", str(old)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no β and γ chosen apart on tuning seeds" in err


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
    for name in ("code-nodoc-train", "prose-train", "code-nodoc-val", "prose-val", "mixed-val"):
        sets[name] = tmp_path / name
        rows = 100 if name == "prose-val" else 10_000
        (tmp_path / f"{name}.json").write_text(json.dumps({"stats": {"rows": rows}}))
    data = dataclasses.replace(setup.data, val_path=str(sets["mixed-val"]), sources=[
        dataclasses.replace(src, path=str(sets[f"{src.name}-train"])) for src in setup.data.sources], val_sets=[
        dataclasses.replace(v, path=str(sets[f"{v.name}-val"])) for v in setup.data.val_sets])
    with pytest.raises(moe.ExperimentError, match=r"prose-val holds 100 rows, fewer than the 512 .* raise "
                                                   r"data.val_percent"):
        moe.check_validation_rows(dataclasses.replace(setup, data=data))
    # a source's own set may hold half of what val_loss's set must; val_loss's set must hold it all
    (tmp_path / "prose-val.json").write_text(json.dumps({"stats": {"rows": setup.val_rows // 2}}))
    moe.check_validation_rows(dataclasses.replace(setup, data=data))
    (tmp_path / "mixed-val.json").write_text(json.dumps({"stats": {"rows": setup.val_rows - 1}}))
    with pytest.raises(moe.ExperimentError, match=rf"mixed-val holds {setup.val_rows - 1} rows, fewer than the "
                                                   rf"{setup.val_rows} "):
        moe.check_validation_rows(dataclasses.replace(setup, data=data))


def test_set_overrides_reach_the_packed_sets_and_a_set_split_otherwise_is_refused(setup, tmp_path, monkeypatch,
                                                                                  capsys):
    gpu = moe.setup(("data.val_percent=30", "trainer.eval_batches=512"))  # what tools/gpu_check.sh 44 passes
    assert (gpu.data.val_percent, gpu.val_rows) == (30.0, 512 * 16)
    sources = [dataclasses.replace(src, path=str(tmp_path / src.name)) for src in gpu.data.sources]
    data = dataclasses.replace(gpu.data, sources=sources, val_sets=[], val_path=str(tmp_path / "all-val"))
    for prefix in (*(src.path for src in sources), data.val_path):  # packed on the CPU, 10% held out
        source = {"inputs": ["stdlib:code-nodoc:train"], "val_percent": 10.0}
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
    _measured(s.measure_dir)  # centres 0.01 and 0.2
    for seed in moe.TUNING_SEEDS:
        for b, val in zip((0.0025, 0.01, 0.04), (4.3, 4.2, 4.4)):
            fake_run(s.tune_dir / f"b{b}-{seed}", seed, ortho=b, val=val)
        for g, val in zip((0.05, 0.2, 0.8), (4.3, 4.1, 4.2)):
            fake_run(s.tune_dir / f"g{g}-{seed}", seed, var=g, val=val)
    for seed in moe.SEEDS:
        fake_run(s.arms_dir / f"aux-{seed}", seed, val=4.0 + 0.1 * seed)
        for b, g, dv in ((0.01, 0.0, 0.05), (0.0, 0.2, -0.02), (0.01, 0.2, 0.01)):
            fake_run(s.arms_dir / f"b{b}-g{g}-{seed}", seed, b, g, val=4.0 + 0.1 * seed + dv, purity=0.7)
    result = moe.stage_report(s, 2, tmp_path / "out", "moe", 0.2, dry=False)
    written = json.loads((tmp_path / "out" / "moe.json").read_text())
    assert {k: (v["chosen"], v["at_edge"]) for k, v in written["tuning"].items()} == \
        {k: (v["chosen"], v["at_edge"]) for k, v in result["tuning"].items()} == \
        {"ortho_loss": (0.01, False), "var_loss": (0.2, False)}
    commands = written["provenance"]["experiment_commands"]
    assert commands[0] == "python pretrain/main.py +experiment=moe_pretrain" and len(commands) == 1 + 1 + 6 + 4
    assert "model.moe.ortho_loss=0.01 model.moe.var_loss=0.2 seed=1,2,3,4,5" in commands[-1]
    setup_ = written["setup"]
    assert setup_["reported_seeds"] == [1, 2, 3, 4, 5] and "moe_continue.yaml" in setup_
    assert setup_["magnitudes"]["centres"] == {"ortho_loss": 0.01, "var_loss": 0.2}
    assert setup_["targets"] == {"ortho_loss": 1e-4, "var_loss": 1e-3} and setup_["grid"] == [0.25, 1.0, 4.0]
    pairs = written["paired_vs_aux_only"]
    assert set(pairs) == {"aux + ortho (beta=0.01)", "aux + var (gamma=0.2)",
                          "aux + ortho (beta=0.01) + var (gamma=0.2)"}
    assert pairs["aux + var (gamma=0.2)"]["val_loss"]["diffs"] == pytest.approx([-0.02] * 5)
    assert written["pretrained"]["folder"] == str(s.pretrain_dir)
    printed = capsys.readouterr().out
    assert "purity" in printed and "routing_var" in printed


def test_the_mixed_validation_set_holds_both_sources_in_every_prefix():
    from data.corpus import Document

    code = [Document(f"c{k}", "x" * 100) for k in range(30)]
    prose = [Document(f"p{k}", "y" * 300) for k in range(5)]
    merged = list(moe.interleaved([code, prose]))
    assert sorted(d.name for d in merged) == sorted(d.name for d in code + prose)  # nothing dropped or repeated
    assert [d.name for d in merged if d.name.startswith("c")] == [d.name for d in code]  # each source in order
    for cut in range(4, 20):  # every prefix: the characters of each source within one document of each other
        given = {src: sum(len(d.text) for d in merged[:cut] if d.name.startswith(src)) for src in "cp"}
        assert abs(given["c"] - given["p"]) <= 300
