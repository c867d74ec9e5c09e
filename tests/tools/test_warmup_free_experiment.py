"""tools/experiments/warmup_free_experiment.py: the multiruns of docs/results/warmup_free.md, the choice taken
from the tuning runs or given, finished stages skipped (no training)."""

from __future__ import annotations

import json
import math

import pytest

from tests.helpers import COMMIT
from tools.experiments import warmup_free_experiment as wf
from tools.experiments import warmup_free_report
from tools.experiments.preregistration import WARMUP_LONG


def _run(folder, preset: str, seed: int, lr: float, warmup: int = 0, tau: float | None = None, val: float = 4.0):
    """A finished run folder as the presets' runs write it (the config keys the driver and report read)."""
    folder.mkdir(parents=True)
    config = {"name": preset, "seed": seed, "lr": {"warmup_steps": warmup},
              "optim": {"lr": lr, "quack": False, "spectral": {"enabled": tau is not None, "tau": tau or 0.05}}}
    (folder / "run_info.json").write_text(json.dumps({"config": config, "git_revision": COMMIT, "validation": {
        "val_loss": {"digest": "one-set", "tokens": 131072}}}))
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


def _long_multirun(root, launched: list, loss):
    """A stand-in for the long design's multiruns: a finished run per point of its argv, loss(method, value, lr,
    seed) (a run that exists already ends at once)."""
    def launch(argv):
        launched.append(argv)
        values = dict(a.split("=", 1) for a in argv if "=" in a)
        preset, folder = values["+experiment"], root / values["hydra.sweep.dir"].rsplit("/", 1)[-1]
        key = "optim.spectral.tau" if preset.endswith("spectral") else "lr.warmup_steps"
        for value in map(float, values[key].split(",")):
            for lr in map(float, values["optim.lr"].split(",")):
                for seed in map(int, values["seed"].split(",")):
                    spectral = preset.endswith("spectral")
                    warmup, tau = (0, value) if spectral else (int(value), None)
                    name = "spectral" if spectral else "adamw + warmup" if warmup else "adamw"
                    if not (run := folder / f"{preset}-{value:g}-{lr:g}-{seed}").exists():
                        _run(run, preset, seed, lr, warmup, tau, loss(name, value, lr, seed))
    return launch


def test_the_long_design_tunes_each_method_extends_an_edge_and_reports_with_the_registered_margin(
        tmp_path, monkeypatch, capsys, committed_checkout):
    """Warmup's best length is the registered grid's top (1000 steps): one extension (capped at half the run,
    1500) brackets it; its best rate is the rate grid's top (3e-2): 9e-2 brackets it. The bound's τ and rate
    and AdamW's rate lie inside. Reported: the bound 0.003-0.007 below warmup (lower, and equivalent within
    ±0.02), AdamW without warmup about 0.1 above (higher, not equivalent)."""
    monkeypatch.setattr(wf, "LONG_RUNS", tmp_path)
    best = {"adamw": (0, 3e-3), "adamw + warmup": (1000, 3e-2), "spectral": (0.05, 1e-2)}
    shift = {"adamw": 0.1, "adamw + warmup": 0.0, "spectral": -0.005}

    def loss(name, value, lr, seed):
        v, rate = best[name]
        noise = 0.002 * (-1) ** seed if name != "adamw + warmup" else 0.0
        off_value = abs(math.log(value / v)) if v else 0.0
        return 3.0 + shift[name] + noise + 0.01 * seed + abs(math.log(lr / rate)) + off_value

    launched = []
    monkeypatch.setattr(wf, "launch", _long_multirun(tmp_path, launched, loss))
    assert wf.main(["--design", "long", "--stage", "reported"]) == 2  # nothing chosen yet: one line
    assert "run --stage tune and tune-lr first" in capsys.readouterr().err
    assert wf.main(["--design", "long", "--stage", "tune", "tune-lr", "reported"]) == 0
    tags = [" ".join(a[4:8]) for a in launched]
    assert tags == [
        "+experiment=warmup_free_long_adamw lr.warmup_steps=0 optim.lr=0.001,0.003,0.01 seed=100,101",
        "+experiment=warmup_free_long_adamw_warmup lr.warmup_steps=30,100,300,1000 optim.lr=0.01 seed=100,101",
        "+experiment=warmup_free_long_spectral optim.spectral.tau=0.02,0.05,0.1,0.2 optim.lr=0.01 seed=100,101",
        "+experiment=warmup_free_long_adamw_warmup lr.warmup_steps=30,100,300,1000,1500 optim.lr=0.01 seed=100,101",
        "+experiment=warmup_free_long_adamw_warmup lr.warmup_steps=1000 optim.lr=0.003,0.01,0.03 seed=100,101",
        "+experiment=warmup_free_long_spectral optim.spectral.tau=0.05 optim.lr=0.003,0.01,0.03 seed=100,101",
        "+experiment=warmup_free_long_adamw_warmup lr.warmup_steps=1000 optim.lr=0.003,0.01,0.03,0.09 seed=100,101",
        "+experiment=warmup_free_long_adamw lr.warmup_steps=0 optim.lr=0.003 seed=1,2,3,4,5,6,7,8,9,10",
        "+experiment=warmup_free_long_adamw_warmup lr.warmup_steps=1000 optim.lr=0.03 seed=1,2,3,4,5,6,7,8,9,10",
        "+experiment=warmup_free_long_spectral optim.spectral.tau=0.05 optim.lr=0.01 seed=1,2,3,4,5,6,7,8,9,10"]
    launched.clear()
    assert wf.main(["--design", "long", "--stage", "tune", "tune-lr", "reported"]) == 0 and launched == []
    capsys.readouterr()
    assert wf.main(["--design", "long", "--stage", "report", "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "warmup_free_long.json").read_text())
    choice = result["choice"]
    assert (choice["adamw + warmup"]["value"], choice["adamw + warmup"]["lr"]) == (1000, 0.03)
    warmup = choice["adamw + warmup"]
    assert warmup["values"] == [30, 100, 300, 1000, 1500] and not warmup["lr_at_edge"] and not warmup["value_at_edge"]
    assert (choice["spectral"]["value"], choice["spectral"]["lr"], choice["adamw"]["lr"]) == (0.05, 0.01, 0.003)
    assert result["margin"] == WARMUP_LONG.margin and result["on_edge"] == []
    spectral, adamw = result["paired"]["spectral − adamw + warmup"], result["paired"]["adamw − adamw + warmup"]
    assert spectral["seeds"] == list(WARMUP_LONG.seeds) and spectral["mean"] == pytest.approx(-0.005)
    assert spectral["verdict"] == "lower, by less than 0.02" and spectral["equivalence"]["margin"] == 0.02
    assert adamw["verdict"] == "higher" and adamw["equivalence"]["equivalent"] is False
    assert (tmp_path / "out" / "warmup_free_long.png").stat().st_size > 0


def test_a_choice_still_on_the_edge_after_its_extensions_is_named(tmp_path, committed_checkout):
    """τ keeps improving downwards: the grid grows by MAX_EXTENSIONS values and the choice stays on its edge."""
    from tools.experiments.runs import load_runs

    design = WARMUP_LONG
    for tau in (*design.taus, 0.008, 0.0032):
        for seed in design.tuning_seeds:
            _run(tmp_path / f"s-{tau}-{seed}", design.presets[2], seed, design.tune_at, 0, tau, 3.0 + tau)
    choice = warmup_free_report.choose_long(load_runs(tmp_path), design)["spectral"]
    assert choice["values"] == [0.0032, 0.008, 0.02, 0.05, 0.1, 0.2] and choice["value"] == 0.0032
    assert choice["value_at_edge"] and choice["lr"] is None and not choice["settled"]  # tune-lr has not run
    assert warmup_free_report.edges_long({"spectral": choice}) == [
        "spectral: value 0.0032 on the edge of [0.0032, 0.008, 0.02, 0.05, 0.1, 0.2]"]
