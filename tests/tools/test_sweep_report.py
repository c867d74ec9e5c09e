"""tools/sweep_report.py on synthetic sweeps with a known optimal-LR exponent, and on run folders."""

import dataclasses
import json
import math

import numpy as np
import pytest

from tools.sweep_report import Run, analyze, load_runs, main, max_stable_lrs, optimal_lr

WIDTHS = (64, 128, 256, 512, 1024)
LRS = tuple(float(x) for x in np.geomspace(1e-4, 1e-1, 10))


def _loss(width: int, lr: float, exponent: float, noise: float = 0.0, rng=None) -> float:
    # a bowl in log-LR around lr*(n) = 1e-2 (n / 64)^exponent, lower for wider models
    best = 1e-2 * (width / 64) ** exponent
    value = 3.0 - 0.1 * math.log(width) + 0.05 * math.log(lr / best) ** 2
    return value + (noise * rng.standard_normal() if rng is not None else 0.0)


def _runs(exponent: float, seeds=(0,), noise: float = 0.0, max_stable=None, lrs=LRS) -> list[Run]:
    rng = np.random.default_rng(1)
    runs = []
    for w in WIDTHS:
        for lr in lrs:
            for s in seeds:
                stable = max_stable is None or lr <= max_stable(w)
                runs.append(Run(w, lr, s, "completed" if stable else "diverged",
                                _loss(w, lr, exponent, noise, rng) if stable else None, first_loss=10.0))
    return runs


@pytest.mark.parametrize("exponent", [-0.42, -0.5, -1.0])
def test_fit_recovers_a_known_exponent(exponent):
    summary = analyze(_runs(exponent), n_boot=200)
    assert summary["exponent"] == pytest.approx(exponent, abs=0.02)
    lo, hi = summary["exponent_ci"]
    assert lo - 1e-6 <= summary["exponent"] <= hi + 1e-6


def test_noisy_seeds_give_a_ci_that_covers_the_truth():
    summary = analyze(_runs(-0.42, seeds=(0, 1, 2), noise=0.01), n_boot=500)
    lo, hi = summary["exponent_ci"]
    assert lo <= -0.42 <= hi and hi - lo < 0.5
    assert summary["ci_method"].startswith("seeds")
    assert summary["exponent"] == pytest.approx(-0.42, abs=0.08)


def test_parabola_refines_between_grid_points():
    grid = [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2]
    true = 3e-3  # between two grid points
    lr, at_edge = optimal_lr({x: math.log(x / true) ** 2 for x in grid})
    assert lr == pytest.approx(true, rel=1e-6) and not at_edge
    lr, at_edge = optimal_lr({x: -math.log(x) for x in grid})  # still falling: minimum at the edge
    assert lr == pytest.approx(grid[-1]) and at_edge


def test_diverged_runs_are_unstable_and_set_the_max_stable_lr():
    fine = tuple(float(x) for x in np.geomspace(1e-4, 1e-1, 31))  # x1.26 steps: the bound is a grid point
    runs = _runs(-0.5, max_stable=lambda w: 5e-2 * (w / 64) ** -0.6, lrs=fine)
    stable = max_stable_lrs(runs)
    for w, (lr, censored) in stable.items():
        assert lr <= 5e-2 * (w / 64) ** -0.6 and not censored
    summary = analyze(runs, n_boot=100)
    assert summary["n_unstable"] == sum(r.status == "diverged" for r in runs) > 0
    assert summary["max_stable_exponent"] == pytest.approx(-0.6, abs=0.1)
    # a finite run that ends above its starting loss counts as unstable too
    assert not Run(64, 1.0, 0, "completed", 12.0, first_loss=10.0).stable


def _write_run(folder, width, lr, seed, status, val, logit=None):
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps(
        {"status": status, "final_val_loss": val, "hidden_size": width, "lr": lr, "seed": seed}))
    rows = [{"step": 1, "loss": 9.0}, {"step": 2, "loss": 8.0, **({"stability/logit_norm": logit} if logit else {})}]
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{truncated")


def test_cli_writes_json_and_plots(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for w in (64, 128, 256):
        for lr in (1e-3, 3e-3, 1e-2, 3e-2):
            val = 2.0 + math.log(lr / (1e-2 * (w / 64) ** -0.5)) ** 2
            _write_run(sweep / f"w{w}_lr{lr}", w, lr, 0, "completed", val, logit=float(w))
    _write_run(sweep / "w64_lr1", 64, 1.0, 0, "diverged", None)
    assert main([str(sweep), "--out", str(tmp_path / "out"), "--bootstrap", "100"]) == 0
    summary = json.loads((tmp_path / "out" / "sweep_report.json").read_text())
    assert {"exponent", "exponent_ci", "widths"} <= set(summary) and summary["n_unstable"] == 1
    assert summary["widths"]["128"]["logits"]["stability/logit_norm"] == 128.0
    for png in ("loss_vs_lr.png", "optimal_lr_vs_width.png", "logit_norm_vs_width.png"):
        assert (tmp_path / "out" / png).stat().st_size > 0
    assert "| 256 |" in capsys.readouterr().out
    assert len(load_runs(sweep)) == 13


def test_missing_logits_and_empty_sweep(tmp_path, capsys):
    _write_run(tmp_path / "s" / "a", 64, 1e-3, 0, "completed", 3.0)
    _write_run(tmp_path / "s" / "b", 64, 3e-3, 0, "completed", 2.5)
    assert main([str(tmp_path / "s"), "--bootstrap", "10"]) == 0
    assert "no stability/logit_norm" in capsys.readouterr().out
    assert not (tmp_path / "s" / "report" / "logit_norm_vs_width.png").exists()
    assert main([str(tmp_path / "empty")]) == 2


def test_the_paper_reference_follows_the_sweeps_optimizer():
    adam, sgd = _runs(-0.5), [dataclasses.replace(r, optimizer="sgd") for r in _runs(-0.5)]
    assert analyze(adam, 10)["paper_reference"] == "adam_optimal"
    assert analyze(sgd, 10)["paper_reference"] == "sgd_clipped_optimal" and analyze(sgd, 10)["optimizer"] == "sgd"


def test_metrics_of_a_killed_run_are_read_up_to_the_cut(tmp_path):
    from pretrain.rundir import read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2] and read_metrics(tmp_path / "none") == []


def test_json_is_written_whole_or_not_at_all(tmp_path):
    from pretrain.rundir import write_json

    write_json(tmp_path / "a.json", {"x": 1.5})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1.5}
    with pytest.raises(TypeError):  # fails while serialising: the old file stays as it was
        write_json(tmp_path / "a.json", {"x": object()})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1.5}
