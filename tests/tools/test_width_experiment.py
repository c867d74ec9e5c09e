"""tools/experiments/width_experiment.py and width_report.py: the LR steps' names, when a grid widens, the
stage commands (--dry-run), the whole adaptive grid and transfer driven against a synthetic trainer (the
launcher writes run folders whose losses follow a known optimum), the fit and the transfer's pairing, and
the fit's seeds kept apart from the reported ones. No training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pretrain.rundir import scored_validation
from tests.helpers import COMMIT
from tools import sweep_report
from tools.experiments import width_experiment as exp
from tools.experiments import width_report
from tools.experiments import ExperimentError
from tools.experiments.provenance import one_validation_set
from tools.experiments.seeds import REPORTED_SEEDS, TUNING_SEEDS

EXPONENT = -0.7  # the synthetic trainer's: its optimal LR is OPT_32 * (n / 32)^EXPONENT
OPT_32 = 2e-2
DIVERGES_ABOVE = 6.0  # x the optimum: above it a run diverges


def _opt(width: int) -> float:
    return OPT_32 * (width / 32) ** EXPONENT


def _val(width: int, lr: float, seed: int) -> float:
    # a bowl in log-LR, lower for wider models; seeds shift it (data order), which moves no minimum
    return 5.5 - 0.1 * math.log(width) + 0.08 * math.log(lr / _opt(width)) ** 2 + 0.01 * seed


def _write(folder, width: int, lr: float, seed: int, val: float | None, optim: dict | None = None) -> None:
    """A finished run folder as keel writes it (result.json, metrics.jsonl, run_info.json)."""
    status = "completed" if val is not None else "diverged"
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({"status": status, "final_val_loss": val, "hidden_size": width,
                                                    "lr": lr, "seed": seed}))
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    config = {"seed": seed, "model": {"hidden_size": width, "head_dim": 16},
              "optim": {"name": "adamw", "lr": lr, "lr_rule": "global", **(optim or {})}}
    validation = {"val_loss": {"digest": "one-set", "tokens": 131072}}  # every run scored the same rows
    info = {"config": config, "command": "synthetic", "validation": validation, "git_revision": COMMIT}
    (folder / "run_info.json").write_text(json.dumps(info))


def _overrides(argv: list[str]) -> dict[str, list[str]]:
    return {k: v.split(",") for k, _, v in (a.partition("=") for a in argv if "=" in a)}


def fake_launch(argv: list[str]) -> None:
    """The synthetic trainer: one run folder per point of the multirun, named like Hydra's."""
    o = _overrides(argv)
    width, folder = int(o["model.hidden_size"][0]), exp.ROOT / o["hydra.sweep.dir"][0]
    optim = {"lr_rule": "sp_width", "base_width": int(o["optim.base_width"][0])} if "optim.lr_rule" in o else {}
    for alpha in o.get("optim.width_exponent", [None]):
        for lr in map(float, o["optim.lr"]):
            peak = lr if not optim else lr * (width / optim["base_width"]) ** -float(alpha)
            for seed in map(int, o["seed"]):
                name = f"w{width}_lr{lr}_a{alpha}_s{seed}"
                val = _val(width, peak, seed) if peak < DIVERGES_ABOVE * _opt(width) else None
                rule = {**optim, "width_exponent": float(alpha)} if optim else None
                _write(folder / name, width, lr, seed, val, rule)


@pytest.fixture
def runs_in(tmp_path, monkeypatch):
    """The repository root moved to tmp_path: runs/width is the tests' own (cwd restored afterwards)."""
    monkeypatch.setattr(exp, "ROOT", tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- learning rates by step ------------------------------------------------------------------------------
def test_each_sqrt2_step_has_one_spelling():
    for k in range(-12, 25):
        lr = exp.step_lr(k)
        assert lr == float(f"{lr:.4g}") and exp.lr_step(lr) == k
        # computed another way, with other float noise (at k = -12 its 4-digit rounding even differs: a tie),
        # an LR still has the same step: runs are matched on steps, never on spellings
        assert exp.lr_step(exp.BASE_LR * math.sqrt(2) ** k) == k
    assert [exp.step_lr(k) for k in (0, 1, 2, 3, -1)] == [0.001, 0.001414, 0.002, 0.002828, 0.0007071]
    centre = 3.217e-3  # a search around an LR off the grid steps the same way
    assert [exp.lr_step(exp.step_lr(k, centre), centre) for k in range(-4, 5)] == list(range(-4, 5))


def test_every_width_has_whole_heads_of_16_and_its_own_init():
    from pretrain.config import compose_config

    for width in (*exp.WIDTHS, exp.TRANSFER_WIDTH):
        std = exp.init_std(width)
        cfg = compose_config(["+experiment=width_sweep", f"model.hidden_size={width}", f"model.init_std={std}"])
        assert cfg.model.heads == width // 16 and cfg.model.heads * 16 == width and cfg.model.ffn_size == 4 * width
        assert cfg.model.init_std == pytest.approx(math.sqrt(2 / (5 * width)), rel=1e-3)
        assert (cfg.trainer.max_steps, cfg.trainer.eval_batches, cfg.optim.lr_rule) == (120, 128, "global")


# --- when a grid widens ----------------------------------------------------------------------------------
def _points(losses: dict[int, dict[int, float | None]], first_loss: float = 9.0) -> exp.Points:
    """step -> seed -> run; None is a diverged run."""
    def run(k: int, seed: int, val: float | None) -> sweep_report.Run:
        return sweep_report.Run(64, exp.step_lr(k), seed, "completed" if val is not None else "diverged", val,
                                first_loss=first_loss)

    return {k: {s: run(k, s, v) for s, v in by_seed.items()} for k, by_seed in losses.items()}


def test_a_minimum_on_the_lowest_step_widens_downwards():
    falling = {0: {1: 5.0, 2: 5.1}, 1: {1: 5.2, 2: 5.2}, 2: {1: None, 2: 6.0}}
    assert exp.widen(_points(falling), until_divergence=True) == (True, False)
    one_seed = {0: {1: 5.3, 2: 5.0}, 1: {1: 5.1, 2: 5.2}, 2: {1: 5.2, 2: None}}  # only seed 2 is lowest at 0
    assert exp.widen(_points(one_seed), until_divergence=True) == (True, False)


def test_a_top_that_has_not_diverged_widens_upwards():
    bowl = {0: {1: 5.3, 2: 5.4}, 1: {1: 5.1, 2: 5.2}, 2: {1: 5.4, 2: 5.5}}
    assert exp.widen(_points(bowl), until_divergence=True) == (False, True)
    assert exp.widen(_points(bowl), until_divergence=False) == (False, False)  # the transfer's search stops here
    rising = {0: {1: 5.3, 2: 5.4}, 1: {1: 5.2, 2: 5.3}, 2: {1: 5.1, 2: 5.2}}  # minimum at the top: up either way
    assert exp.widen(_points(rising), until_divergence=False) == (False, True)


def test_a_diverged_top_above_an_inner_optimum_completes_the_grid():
    assert exp.widen(_points({0: {1: 5.3, 2: 5.4}, 1: {1: 5.1, 2: 5.2}, 2: {1: 5.4, 2: None}}), True) == (False, False)
    # ending above the starting loss counts as diverged (sweep_report.Run.stable), as does one seed alone
    worse = _points({0: {1: 5.3, 2: 5.4}, 1: {1: 5.1, 2: 5.2}, 2: {1: 5.4, 2: 9.5}})
    assert exp.widen(worse, until_divergence=True) == (False, False)


def test_a_grid_runs_its_missing_points_first_and_widens_within_its_caps():
    grid = exp.Grid((0, 1, 2), floor=-1, ceiling=3, until_divergence=True)
    falling = {0: {1: 5.0, 2: 5.1}, 1: {1: 5.2, 2: 5.2}, 2: {1: 5.3, 2: 5.3}}  # down, and up (top stable)
    assert grid.next_steps(_points({0: falling[0]}), seeds=(1, 2)) == [1, 2]
    assert grid.next_steps(_points({**falling, 1: {1: 5.2}}), seeds=(1, 2)) == [1]  # seed 2 missing at step 1
    assert grid.next_steps(_points(falling), seeds=(1, 2)) == [-1, 3]
    wider = {-1: {1: 4.9, 2: 5.0}, **falling, 3: {1: 5.4, 2: 5.5}}
    assert grid.next_steps(_points(wider), seeds=(1, 2)) == []  # both caps reached: the fit flags the edge


def test_the_first_grid_brackets_the_first_runs_optima():
    for width in exp.WIDTHS:
        steps = exp.initial_grid(width).steps
        prior = exp.PRIOR_OPT_LR.get(width) or exp.PRIOR_OPT_LR[256] * 2 ** exp.PRIOR_EXPONENT
        assert len(steps) == 5 and exp.step_lr(steps[0]) < prior < exp.step_lr(steps[-1])


# --- the stages ------------------------------------------------------------------------------------------
def test_dry_run_prints_the_first_grid_and_runs_nothing(runs_in, monkeypatch, capsys):
    monkeypatch.setattr(exp, "launch", lambda argv: pytest.fail(f"launched {argv}"))
    assert exp.main(["--dry-run", "--jobs", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    multiruns = [line for line in lines if line.startswith("python pretrain/main.py")]
    assert len(multiruns) == len(exp.WIDTHS)
    assert multiruns[0] == ("python pretrain/main.py -m hydra/launcher=local hydra.launcher.n_jobs=2 "
                            "+experiment=width_sweep model.hidden_size=32 model.init_std=0.1118 "
                            "optim.lr=0.01131,0.016,0.02263,0.032,0.04525 "
                            f"seed=1,2,3 hydra.sweep.dir={exp.RUNS / 'grid'}")
    assert all(f"model.hidden_size={w} " in line for w, line in zip(exp.WIDTHS, multiruns))
    assert any(line.startswith("(fit)") for line in lines) and any("grid stage first" in line for line in lines)
    assert lines[-1].startswith("python tools/experiments/width_report.py")
    assert not (runs_in / "runs").exists()


def test_the_grid_widens_until_every_width_brackets_its_optimum_and_diverges_above(runs_in, monkeypatch, capsys):
    launched = []
    monkeypatch.setattr(exp, "launch", lambda argv: (launched.append(argv), fake_launch(argv)))
    assert exp.main(["--stage", "grid"]) == 0
    runs = width_report.load(exp.RUNS / "grid")
    for width in exp.WIDTHS:
        points = exp.points_of([r for r in runs if r.width == width], exp.lr_step)
        steps = sorted(points)
        assert steps == list(range(steps[0], steps[-1] + 1))  # contiguous sqrt(2) steps
        assert all(set(by_seed) == set(exp.SEEDS) for by_seed in points.values())  # every seed everywhere
        assert exp.step_lr(steps[0]) < _opt(width) < exp.step_lr(steps[-1])
        assert not any(r.stable for r in points[steps[-1]].values())  # the top diverged
        assert all(r.stable for r in points[steps[-2]].values())  # one step past the first failure, no more
    assert len(launched) > len(exp.WIDTHS)  # at least one round widened
    launched.clear()
    assert exp.main(["--stage", "grid"]) == 0  # complete: skipped
    assert launched == [] and "grid: every run has finished" in capsys.readouterr().out


def test_fit_recovers_the_exponent_with_no_optimum_on_an_edge(runs_in, monkeypatch):
    monkeypatch.setattr(exp, "launch", fake_launch)
    exp.main(["--stage", "grid"])
    assert exp.main(["--stage", "fit", "--bootstrap", "100"]) == 0
    f = json.loads((exp.RUNS / "fit.json").read_text())
    assert f["exponent"] == pytest.approx(EXPONENT, abs=0.05) and f["edges"] == []
    assert f["seeds"] == list(exp.SEEDS) and sorted(map(int, f["widths"])) == list(exp.WIDTHS)
    lo, hi = f["exponent_ci"]
    assert lo <= f["exponent"] <= hi
    assert f["anchor"]["base_width"] == 512 and f["anchor"]["base_lr"] == pytest.approx(_opt(512), rel=0.1)
    assert f["anchor"]["alpha"] == width_report.canonical(-f["exponent"])
    assert all(not e["max_stable_censored"] for e in f["widths"].values())  # divergence bounds every width


def test_an_optimum_on_a_grid_edge_is_named_in_the_fit():
    runs = [sweep_report.Run(w, exp.step_lr(k), 1, "completed", 5.0 - 0.1 * k if w == 64 else 5.0 + (k - 1) ** 2,
                             first_loss=9.0) for w in (32, 64) for k in range(3)]
    runs.append(sweep_report.Run(128, exp.step_lr(0), 1, "completed", 5.0, first_loss=9.0))
    runs += [sweep_report.Run(128, exp.step_lr(k), 1, "completed" if k == 1 else "diverged", 4.9 if k == 1 else None,
                              first_loss=9.0) for k in (1, 2)]
    edges = {(e["width"], e["edge"]) for e in width_report.fit(runs, n_boot=10)["edges"]}
    assert edges == {(64, "highest LR"), (128, "highest stable LR")}


def test_transfer_runs_the_fitted_rule_the_papers_and_a_search_around_it(runs_in, monkeypatch, capsys,
                                                                        committed_checkout):
    monkeypatch.setattr(exp, "launch", fake_launch)
    exp.main(["--stage", "grid"])
    anchor = exp.fitted()["anchor"]
    rule, search = exp.transfer_argvs(jobs=2)
    o = _overrides(rule)
    assert o["optim.lr_rule"] == ["sp_width"] and o["optim.base_width"] == ["512"]
    assert o["optim.width_exponent"] == [f"{anchor['alpha']:g}", "0.42"] and o["optim.lr"] == [f"{anchor['base_lr']:g}"]
    assert o["seed"] == ["4", "5", "6"] and o["model.hidden_size"] == ["768"]
    centre = width_report.predicted_lr(anchor, 768, anchor["alpha"])
    s = _overrides(search)
    assert [exp.lr_step(float(lr), centre) for lr in s["optim.lr"]] == [-2, -1, 1, 2] and "optim.lr_rule" not in s
    assert exp.main(["--stage", "transfer"]) == 0
    assert exp.transfer_argvs(jobs=2) == []  # the fit transfers: the search's best is inside it
    out = runs_in / "docs"
    assert exp.main(["--stage", "report", "--out", str(out), "--bootstrap", "20"]) == 0
    report = json.loads((out / "width_scaling.json").read_text())
    t = report["transfer"]
    assert t["seeds"] == [4, 5, 6] and t["width"] == 768 and not t["best_at_edge"]
    fitted_arm = t["arms"]["fitted"]
    assert fitted_arm["lr"] == pytest.approx(centre, rel=1e-9) and fitted_arm["predicted_lr"] == pytest.approx(centre)
    d = fitted_arm["minus_best_searched"]
    best = t["search"][repr(t["best_searched_lr"])]
    assert d["seeds"] == [4, 5, 6] and d["diffs"] == pytest.approx([fitted_arm["val_loss"][str(s)] - best[str(s)]
                                                                   for s in (4, 5, 6)])
    assert report["provenance"]["experiment_commands"] and report["fit"]["edges"] == []
    assert report["val_digests"] == {"val_loss": ["one-set"]}
    for png in ("loss_vs_lr", "optimal_lr", "transfer"):
        assert (out / f"width_scaling_{png}.png").stat().st_size > 0


def test_a_search_whose_best_is_at_its_end_widens(runs_in, monkeypatch):
    monkeypatch.setattr(exp, "launch", fake_launch)
    exp.main(["--stage", "grid"])
    anchor = exp.fitted()["anchor"]
    for argv in exp.transfer_argvs(jobs=2):
        fake_launch(argv)
    centre = width_report.predicted_lr(anchor, 768, anchor["alpha"])
    # the optimum at 768 a little above the search's top step: the search must take one more
    for run in width_report.load(exp.RUNS / "transfer"):
        path = Path(run.path) / "result.json"
        result = json.loads(path.read_text())
        result["final_val_loss"] = 5.0 + 0.08 * math.log(run.lr / (centre * 2.2)) ** 2 + 0.01 * run.seed
        path.write_text(json.dumps(result))
    (argv,) = exp.transfer_argvs(jobs=2)
    assert [exp.lr_step(float(lr), centre) for lr in _overrides(argv)["optim.lr"]] == [3]


# --- seeds -----------------------------------------------------------------------------------------------
def test_the_fit_and_the_transfer_use_disjoint_reported_seeds():
    assert not set(exp.SEEDS) & set(exp.TRANSFER_SEEDS)
    assert all(s in REPORTED_SEEDS and s not in TUNING_SEEDS for s in exp.TRANSFER_SEEDS)


ANCHOR = {"base_width": 512, "base_lr": 2.4e-3, "alpha": 0.7}
FIT = {"seeds": [1, 2, 3], "anchor": ANCHOR}


def _transfer_runs(seeds, rules: dict[float, dict[int, float]]) -> list[sweep_report.Run]:
    """A search at 1e-3, 2e-3, 4e-3 (best: 2e-3, loss 5 + 0.01 seed) and, per alpha in `rules`, the rule's run
    at its predicted LR with that loss plus the extra given per seed."""
    runs = []
    for s in seeds:
        runs += [sweep_report.Run(768, lr, s, "completed", 5.0 + abs(math.log(lr / 2e-3)) + 0.01 * s, first_loss=9.0)
                 for lr in (1e-3, 2e-3, 4e-3)]
        for alpha, extra in rules.items():
            lr = width_report.predicted_lr(ANCHOR, 768, alpha)
            runs.append(sweep_report.Run(768, lr, s, "completed", 5.0 + 0.01 * s + extra[s], first_loss=9.0,
                                         lr_rule="sp_width", width_exponent=alpha))
    return runs


def test_the_transfer_pairs_each_rule_with_the_best_searched_lr_seed_by_seed():
    fitted, paper = {4: 0.03, 5: -0.01, 6: 0.01}, {4: 0.054, 5: 0.055, 6: 0.056}
    t = width_report.transfer(_transfer_runs((4, 5, 6), {0.7: fitted, 0.42: paper}), FIT)
    assert t["best_searched_lr"] == 2e-3 and t["seeds"] == [4, 5, 6] and not t["best_at_edge"]
    d = t["arms"]["fitted"]["minus_best_searched"]
    assert d["seeds"] == [4, 5, 6] and d["diffs"] == pytest.approx([0.03, -0.01, 0.01])
    assert d["verdict"] == "interval covers 0"
    d = t["arms"]["paper"]["minus_best_searched"]
    assert d["diffs"] == pytest.approx([0.054, 0.055, 0.056]) and d["interval95"][0] > 0 and d["verdict"] == "higher"
    assert t["paper_minus_fitted"]["diffs"] == pytest.approx([0.024, 0.065, 0.046])
    assert t["arms"]["fitted"]["lr"] == pytest.approx(2.4e-3 * 1.5 ** -0.7)


def test_the_transfer_refuses_the_fits_seeds_and_tuning_seeds():
    rule = {0.7: {s: 0.0 for s in range(200)}}
    with pytest.raises(ExperimentError, match="alpha was fitted on them"):
        width_report.transfer(_transfer_runs((3, 4, 5), rule), FIT)
    with pytest.raises(ExperimentError, match="not reported seeds"):
        width_report.transfer(_transfer_runs((104, 105), rule), FIT)
    with pytest.raises(ExperimentError, match="no sp_width run with the fitted alpha"):
        width_report.transfer(_transfer_runs((4, 5), {0.42: rule[0.7]}), FIT)


def test_runs_on_different_validation_sets_are_not_compared():
    infos = [{"validation": {"val_loss": {"digest": d, "tokens": 1024}}} for d in ("a", "a", "b")]
    with pytest.raises(ExperimentError, match=r"different validation sets: val_loss \(2 different texts\); remove"):
        one_validation_set(infos)
    assert one_validation_set(infos[:2]) == {"val_loss": ["a"]}


def test_provenance_records_the_text_and_tokens_each_validation_set_scored():
    infos = [{"validation": {"val_loss": {"digest": d, "tokens": n}}} for d, n in (("a", 1024), ("b", 2048), ("a", 1024))]
    assert scored_validation(infos) == {"val_loss": {"digests": ["a", "b"], "tokens": [1024, 2048]}}
    assert scored_validation([{"command": "from before validation was recorded"}]) == {}
