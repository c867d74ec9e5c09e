"""tools/experiments/moe_report.py on synthetic run folders: arms from configs, tail means, table, outputs."""

import json

import pytest

from tools.experiments import moe_report


def _fake_run(folder, seed: int, experts: int, ortho: float, var: float, val: float, overlap: list[float]) -> None:
    moe = {"num_experts": experts, "ortho_loss": ortho, "var_loss": var}
    folder.mkdir(parents=True)
    (folder / "run_info.json").write_text(json.dumps({"config": {"seed": seed, "model": {"moe": moe}}}))
    (folder / "result.json").write_text(json.dumps({"status": "completed"}))
    load = {f"moe/layer0/load/{e}": 1 / experts for e in range(experts)}
    rows = [{"step": 5 * (i + 1), "loss": 5.0} | ({"moe/overlap": o} | load if experts else {})
            for i, o in enumerate(overlap)]
    rows[-1]["val_loss"] = val
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_groups_arms_and_averages_the_tail(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed, val in ((1, 5.0), (2, 5.2)):
        _fake_run(runs / f"aux_s{seed}", seed, 8, 0.0, 0.0, val, [0.9] * 8 + [0.4, 0.6])
        _fake_run(runs / f"spec_s{seed}", seed, 8, 0.1, 0.1, val + 0.1, [0.9] * 8 + [0.0, 0.1])
        _fake_run(runs / f"dense_s{seed}", seed, 0, 0.0, 0.0, val - 0.1, [0.0] * 10)
    assert moe_report.main([str(runs), "--out", str(tmp_path / "out"), "--tail", "0.2"]) == 0
    summary = json.loads((tmp_path / "out" / "moe_summary.json").read_text())["arms"]
    assert list(summary) == ["aux only", "dense", "aux + ortho (beta=0.1) + var (gamma=0.1)"]
    mean, std, n = summary["aux only"]["val_loss"]
    assert (mean, std, n) == (pytest.approx(5.1), pytest.approx(0.1414, abs=1e-4), 2)
    assert summary["aux only"]["overlap"][0] == pytest.approx(0.5)  # the last 20% of 10 logged steps: 0.4, 0.6
    assert summary["aux + ortho (beta=0.1) + var (gamma=0.1)"]["overlap"][0] == pytest.approx(0.05)
    assert set(summary["dense"]) == {"val_loss"}
    for png in ("moe_specialization_curves.png", "moe_load_heatmap.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000
    assert "| dense | 2 | 5.0000 ± 0.1414 | — |" in capsys.readouterr().out


def test_report_without_runs_is_one_line_and_exit_2(tmp_path, capsys):
    assert moe_report.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no completed runs" in err and not (tmp_path / "out").exists()
