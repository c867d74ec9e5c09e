"""tools/experiments/cpt_experiment.py: settings from the presets, the stage commands, aggregation and the
reading of run folders (no training)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from tests.helpers import COMMIT
from tools.experiments import cpt_experiment as cpt


@pytest.fixture(scope="module")
def setup() -> cpt.Setup:
    return cpt.setup()


def test_settings_come_from_the_presets(setup):
    from pretrain.config import compose_config

    pre = compose_config(["+experiment=cpt_pretrain"])
    cfg = compose_config(["+experiment=cpt_packing", "data.pack_method=sp"])
    assert setup.seq_len == cfg.data.seq_len == pre.data.seq_len
    assert setup.val_rows == cfg.trainer.eval_batches * cfg.trainer.global_batch_size
    assert str(setup.train["sp"]) == cfg.data.path == f"{setup.pack_prefix}.sp" and str(setup.val) == cfg.data.val_path
    assert str(setup.pretrain_dir) == cfg.init_from == pre.run_dir
    assert setup.cpt_dir == cpt.Path(cfg.run_dir).parent


def test_a_preset_without_method_suffixed_paths_is_one_clear_error(monkeypatch):
    import pretrain.config

    real = pretrain.config.compose_config
    monkeypatch.setattr(pretrain.config, "compose_config", lambda o: real([*o, "data.path=runs/x/train"]))
    with pytest.raises(cpt.ExperimentError, match=r"data.path must be PREFIX.\$\{data.pack_method\}"):
        cpt.setup()


def test_the_grid_is_one_multirun_of_every_method_and_seed_from_one_init(setup):
    grid = cpt.grid_argv(jobs=3)
    assert grid[:4] == ["pretrain/main.py", "-m", "hydra/launcher=local", "hydra.launcher.n_jobs=3"]
    assert "data.pack_method=concat,bfd,sp" in grid and "seed=1,2,3,4,5,6,7,8,9,10" in grid
    assert "+experiment=cpt_packing" in grid
    assert not any(a.startswith(("init_from=", "trainer.max_steps=", "run_dir=")) for a in grid)  # same init, budget
    init = cpt.init_argv(setup)
    assert "-m" not in init and f"run_dir={setup.cpt_dir / cpt.INIT_RUN}" in init and "trainer.max_steps=1" in init
    pack = cpt.pack_argv(setup, cpt.Path("t.model"))
    assert "--compare" in pack and pack[pack.index("--output") + 1] == str(setup.pack_prefix)
    assert pack[pack.index("--val-percent") + 1] == "5"  # the presets' held-out share


def test_sp_packs_at_the_papers_share_of_a_row_and_refuses_sets_packed_otherwise(setup, tmp_path):
    """c = 50 at L = 2048 is 2.4% of a row; at L = 256 the same share is 6 tokens (c = 50 there is 19.5%)."""
    assert [cpt.extra_capacity(n) for n in (2048, 1024, 512, 256, 128, 16)] == [50, 25, 12, 6, 3, 1]
    for argv in (cpt.pack_argv, cpt.pack_sp_r0_argv):
        pack = argv(setup, cpt.Path("t.model"))
        assert pack[pack.index("--extra-capacity") + 1] == "6" == str(cpt.extra_capacity(setup.seq_len))
    s = dataclasses.replace(setup, train={"sp": tmp_path / "x.sp"}, pack_prefix=tmp_path / "x")
    cpt.check_sp_capacity(s)  # nothing packed yet: the training stage itself will say so
    for prefix, c in ((s.train["sp"], 6), (s.sp_r0, 50)):  # r = 0 left from the first re-run's c = 50
        cpt.Path(f"{prefix}.json").write_text(json.dumps({"settings": {"extra_capacity": c}}))
    with pytest.raises(cpt.ExperimentError, match=r"x.sp-r0.json was packed with SP extra capacity 50, not 6 .*"
                                                  "repack it: --stage pack"):
        cpt.check_sp_capacity(s)


def test_set_overrides_reach_the_packed_sets():
    gpu = cpt.setup(overrides=("data.val_percent=30", "trainer.eval_batches=600"))  # as tools/gpu_check.sh 42
    assert (gpu.data.val_percent, gpu.val_rows) == (30.0, 600 * 16)
    for argv in (cpt.pack_argv, cpt.pack_replay_argv, cpt.pack_sp_r0_argv):
        pack = argv(gpu, cpt.Path("t.model"))
        assert pack[pack.index("--val-percent") + 1] == "30"


def test_the_ablation_and_distinct_arms_change_one_thing_each(setup, tmp_path):
    ablation = cpt.ablation_argv(setup, jobs=2)
    assert f"data.path={setup.sp_r0}" in ablation and "data.pack_method=sp" in ablation
    pack = cpt.pack_sp_r0_argv(setup, cpt.Path("t.model"))
    assert pack[pack.index("--method"):pack.index("--method") + 4] == ["--method", "sp", "--overlap-ratio", "0"]
    # BFD pads 10% of its rows' tokens, SP duplicates 5% of the corpus: each runs longer, to CT's distinct tokens
    stats = {"concat": (100, 25_600, 25_600, 0.0), "bfd": (100, 23_040, 23_040, 0.0), "sp": (100, 25_600, 24_000, 0.05)}
    train = {}
    for m, (rows, content, corpus, dup) in stats.items():
        train[m] = tmp_path / f"x.{m}"
        (tmp_path / f"x.{m}.json").write_text(json.dumps({"stats": {"rows": rows, "content_tokens": content,
                                                                    "corpus_tokens": corpus, "duplicated_share": dup}}))
    s = dataclasses.replace(setup, train=train, steps=80)
    assert cpt.distinct_steps(s, "bfd") == math.ceil(80 * 256 / 230.4) == 89
    assert cpt.distinct_steps(s, "sp") == math.ceil(80 * 256 / 244) == 84
    (argv,) = cpt.distinct_argvs(s, 2)  # SP only: BFD's padding is too small on the real corpus to matter
    assert "trainer.max_steps=84" in argv and "checkpoint.interval=84" in argv and "data.pack_method=sp" in argv


def test_arms_are_named_by_packed_set_and_budget():
    def run(data, steps=80):
        return cpt.Run("r", cpt.Path("r"), {"seed": 1, "data": data, "trainer": {"max_steps": steps}}, "completed", [])

    assert cpt.arm_of(run({"pack_method": "sp", "path": "runs/d/t-L256.sp"}), 80) == "sp"
    assert cpt.arm_of(run({"pack_method": "sp", "path": "runs/d/t-L256.sp-r0"}), 80) == "sp-r0"
    assert cpt.arm_of(run({"pack_method": "bfd", "path": "runs/d/t-L256.bfd"}, 89), 80) == "bfd-distinct"
    assert cpt.arm_of(run({"pack_method": "concat", "path": None, "sources": [{"path": "a"}]}), 80) == "replay"


def test_every_arm_is_paired_with_concat_seed_by_seed(setup, tmp_path):
    s = dataclasses.replace(setup, cpt_dir=tmp_path)
    for seed, (ct, sp) in enumerate([(2.50, 2.40), (2.60, 2.52), (2.55, 2.44)], start=1):
        _run(tmp_path / f"concat-{seed}", "concat", seed, "completed", {80: ct})
        _run(tmp_path / f"sp-{seed}", "sp", seed, "completed", {80: sp})
    _run(tmp_path / "bfd-1", "bfd", 1, "completed", {80: 2.5})
    pairs = cpt.paired_with_baseline(cpt.continual_runs(s)[0], "val_loss")
    assert pairs["sp"]["diffs"] == pytest.approx([-0.10, -0.08, -0.11]) and pairs["sp"]["verdict"] == "lower"
    lo, hi = pairs["sp"]["interval95"]
    assert lo < pairs["sp"]["mean"] < hi < 0
    assert pairs["bfd"]["seeds"] == [1] and pairs["bfd"]["verdict"] == "one seed: no interval"
    assert pairs["bfd"]["equivalence"] is None
    tost = pairs["sp"]["equivalence"]  # every pair is also tested for equivalence at the margin fixed beforehand
    assert tost["margin"] == cpt.EQUIVALENCE_MARGIN == 0.015 and not tost["equivalent"] and tost["p_value"] > 0.5
    assert tost["interval90"][0] > pairs["sp"]["interval95"][0]


def test_aggregate_mean_spread_and_band():
    curves = {"concat": {1: {25: 3.0, 50: 2.0}, 2: {25: 3.2, 50: 2.4}, 3: {25: 3.1, 50: 2.2}},
              "sp": {1: {25: 2.9, 50: 1.9}, 2: {25: 3.0, 50: 2.1}, 3: {25: 2.8, 50: 2.0}},
              "bfd": {1: {25: 2.9, 50: 1.9}, 2: {25: 3.0}}}  # seed 2 missed step 50
    rep = cpt.aggregate(curves, init_loss=4.0)
    c = rep["methods"]["concat"]
    assert c["final_step"] == 50 and c["final_val_loss"]["values"] == [2.0, 2.4, 2.2]
    assert c["final_val_loss"]["mean"] == pytest.approx(2.2)
    assert c["final_val_loss"]["std"] == pytest.approx(0.2)  # sample std (ddof=1)
    assert c["final_val_loss"]["spread"] == pytest.approx(0.4)
    assert c["final_val_loss"]["perplexity_of_mean"] == pytest.approx(math.exp(2.2))
    assert c["curve"]["min"] == pytest.approx([3.0, 2.0]) and c["curve"]["max"] == pytest.approx([3.2, 2.4])
    assert c["curve_with_init"]["step"] == [0, 25, 50] and c["curve_with_init"]["mean"][0] == 4.0
    assert rep["methods"]["bfd"]["final_step"] == 25  # only steps every seed evaluated
    # runs that validated before step 1 (init_from's step-0 row) hold their own step 0: nothing is prepended
    own = cpt.aggregate({"concat": {1: {0: 4.1, 25: 3.0}, 2: {0: 4.1, 25: 3.2}}}, init_loss=4.0)["methods"]["concat"]
    assert own["curve"]["step"] == [0, 25] and "curve_with_init" not in own
    ranking = rep["ranking_by_mean_final_val_loss"]
    assert ranking.index("sp") < ranking.index("concat")


def test_plot_writes_a_png(tmp_path):
    rep = cpt.aggregate({"concat": {1: {20: 3.0, 40: 2.0}, 2: {20: 3.1, 40: 2.1}}, "sp": {1: {20: 2.9, 40: 1.9}}}, 4.0)
    cpt.plot(rep, tmp_path / "x.png")
    assert (tmp_path / "x.png").stat().st_size > 1000


def _run(folder, method: str, seed: int, status: str, vals: dict[int, float]) -> None:
    folder.mkdir(parents=True)
    info = {"config": {"seed": seed, "data": {"pack_method": method}}, "git_revision": COMMIT,
            "validation": {"val_loss": {"digest": "one-set", "tokens": 64}}}
    (folder / "run_info.json").write_text(json.dumps(info))
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0, "val_loss": v}) + "\n"
                                                  for s, v in vals.items()))
    (folder / "result.json").write_text(json.dumps({"status": status}))


def test_collect_reads_completed_runs_by_config_and_the_init_run_apart(setup, tmp_path):
    s = dataclasses.replace(setup, cpt_dir=tmp_path)
    _run(tmp_path / "data.pack_method=concat,seed=1", "concat", 1, "completed", {10: 2.6, 20: 2.5})
    _run(tmp_path / "data.pack_method=concat,seed=2", "concat", 2, "diverged", {10: 9.0})
    _run(tmp_path / cpt.INIT_RUN, "concat", 1, "completed", {1: 4.2})  # concat, seed 1 too: kept apart
    curves, init = cpt.collect(*cpt.continual_runs(s))
    assert curves == {"concat": {1: {10: 2.6, 20: 2.5}}} and init == 4.2
    assert not cpt.grid_done(s)
    for method, seed in [(m, seed) for m in ("bfd", "sp") for seed in cpt.SEEDS] + [("concat", s) for s in cpt.SEEDS[2:]]:
        _run(tmp_path / f"{method}-{seed}", method, seed, "completed", {20: 2.0})
    assert not cpt.grid_done(s)  # concat seed 2 diverged
    (tmp_path / "data.pack_method=concat,seed=2" / "result.json").write_text(json.dumps({"status": "completed"}))
    assert cpt.grid_done(s)


def test_a_stage_whose_runs_completed_is_skipped(setup, tmp_path, monkeypatch, capsys):
    s = dataclasses.replace(setup, pretrain_dir=tmp_path / "pre")
    (tmp_path / "pre").mkdir()
    (tmp_path / "pre" / "result.json").write_text(json.dumps({"status": "completed"}))
    monkeypatch.setattr(cpt, "launch", lambda argv: pytest.fail(f"launched {argv}"))
    cpt.stage_training("pretrain", s, jobs=2, dry=False, force=False)
    assert "pretrain: every run has finished; skipped" in capsys.readouterr().out
    launched = []
    monkeypatch.setattr(cpt, "launch", launched.append)
    cpt.stage_training("pretrain", s, jobs=2, dry=False, force=True)  # --force: folder removed, run again
    assert launched == [cpt.pretrain_argv()] and not (tmp_path / "pre").exists()


def test_the_continual_stages_start_together_and_a_finished_one_is_left_out(setup, tmp_path, monkeypatch):
    """--stage continual --concurrent (tools/gpu_check.sh 42): every stage after pretrain at once, as one run_stage."""
    stats = {"rows": 100, "content_tokens": 25_000, "duplicated_share": 0.0, "corpus_tokens": 25_000}
    train = {m: tmp_path / f"x.{m}" for m in cpt.METHODS}
    for path in train.values():  # packed at this driver's SP capacity
        settings = {"extra_capacity": cpt.extra_capacity(setup.seq_len)}
        cpt.Path(f"{path}.json").write_text(json.dumps({"stats": stats, "settings": settings}))
    s = dataclasses.replace(setup, train=train, pack_prefix=tmp_path / "x", cpt_dir=tmp_path / "cpt")
    _run(s.cpt_dir / cpt.INIT_RUN, "concat", 1, "completed", {1: 4.2})
    launched = []
    monkeypatch.setattr(cpt, "launch", launched.append)
    cpt.stage_continual(s, jobs=2, dry=False, force=False, concurrent=True)
    stages = cpt.training_stages(s, 2)
    wanted = [argv for name in cpt.CONTINUAL[1:] for argv in stages[name].argvs()]  # init has finished
    assert sorted(launched) == sorted(wanted) and len(wanted) == 4


@pytest.mark.parametrize("method", ["concat", "bfd", "sp"])
def test_presets_compose_and_match_the_pretrained_model(method):
    from pretrain.config import compose_config

    pre = compose_config(["+experiment=cpt_pretrain"])
    cfg = compose_config(["+experiment=cpt_packing", f"data.pack_method={method}", "seed=2"])
    assert cfg.model == pre.model and pre.data.corpus == "stdlib:code" and cfg.init_from == pre.run_dir
    assert cfg.data.path.endswith(f".{method}")


def test_the_replay_arm_is_cpt_packing_on_a_mixture_validated_on_both_domains(setup):
    from pretrain.config import compose_config

    packing = compose_config(["+experiment=cpt_packing", "data.pack_method=concat", "seed=2"])
    replay = compose_config(["+experiment=cpt_replay", "seed=2"])
    assert (replay.model, replay.trainer, replay.optim, replay.lr, replay.init_from) == \
           (packing.model, packing.trainer, packing.optim, packing.lr, packing.init_from)
    assert replay.data.path is None and [(s.name, s.weight) for s in replay.data.sources] == [("tests", 0.8), ("code", 0.2)]
    assert replay.data.sources[0].path == packing.data.path  # the new domain as the concat arm packs it
    assert replay.data.val_path == packing.data.val_path and replay.data.val_sets == packing.data.val_sets
    assert str(setup.replay_train) == replay.data.sources[1].path and str(setup.original_val) == replay.data.val_sets[0].path
    assert cpt.replay_argv(2)[-2:] == ["+experiment=cpt_replay", "seed=1,2,3,4,5,6,7,8,9,10"]
    assert cpt.pack_replay_argv(setup, cpt.Path("t.model"))[2] == "stdlib:code:train"


@pytest.mark.slow
def test_a_tiny_replay_run_is_collected_and_reported(setup, tiny_data, tmp_path, committed_checkout):
    from tests.helpers import run_keel

    t, v = tiny_data["train"], tiny_data["val"]
    run_keel(["+experiment=cpt_replay", f"run_dir={tmp_path / 'cpt' / 'replay' / 'seed1'}", "init_from=null",
              f"data.tokenizer={tiny_data['tokenizer']}", "data.seq_len=64", "model.hidden_size=64", "model.head_dim=16",
              "model.max_seq_len=64", f"data.sources=[{{path: {t}, weight: 0.8, name: tests}}, "
              f"{{path: {t}, weight: 0.2, name: code}}]", f"data.val_path={v}", f"data.val_sets=[{{name: code, path: {v}}}]",
              "trainer.max_steps=2", "trainer.eval_interval=2", "trainer.eval_batches=1", "trainer.global_batch_size=8",
              "trainer.micro_batch_size=4", "lr.warmup_steps=0"])
    # the run recorded this checkout's revision, "+dirty" while it is being edited: taken as a commit here (the
    # refusal of runs from uncommitted code is tests/tools/test_experiments_common.py's)
    info = tmp_path / "cpt" / "replay" / "seed1" / "run_info.json"
    info.write_text(json.dumps(json.loads(info.read_text()) | {"git_revision": COMMIT}))
    s = dataclasses.replace(setup, cpt_dir=tmp_path / "cpt")
    curves, _ = cpt.collect(*cpt.continual_runs(s))
    forgetting, _ = cpt.collect(*cpt.continual_runs(s), cpt.FORGETTING)
    assert list(curves) == list(forgetting) == ["replay"] and list(curves["replay"][1]) == [2]
    report = cpt.stage_report(s, 2, tmp_path / "r.json", tmp_path / "r.png")
    assert report["forgetting"]["methods"]["replay"]["final_val_loss"]["n"] == 1 and (tmp_path / "r.png").exists()
    prov = report["provenance"]
    assert prov["runs"] == 1 and prov["run_versions"][0]["megatron_core"] == "0.19.2" and prov["dtype"] == "float32"
    assert prov["git_revision"] and any("cpt_replay" in c for c in prov["experiment_commands"])
    assert list(report["val_digests"]) == ["val_loss", "val_loss/code"]
    assert all(len(d) == 1 for d in report["val_digests"].values())
