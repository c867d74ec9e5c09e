"""tools/experiments/warmup_free_report.py on synthetic run folders: methods from configs, extremes, comparison."""

import dataclasses
import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT, child_env

REPORT = ROOT / "tools" / "experiments" / "warmup_free_report.py"


def _fake_run(folder, preset: str, seed: int, losses: list[float], val: float, entropy: float, status="completed"):
    from pretrain.config import compose_config

    cfg = compose_config([f"+experiment={preset}", f"seed={seed}"])
    folder.mkdir(parents=True)
    (folder / "run_info.json").write_text(json.dumps({"config": dataclasses.asdict(cfg)}))
    (folder / "result.json").write_text(json.dumps({"status": status}))
    rows = [{"step": i + 1, "loss": loss} for i, loss in enumerate(losses)]
    rows[-1] |= {"val_loss": val, "stability/attn_entropy_min": entropy, "stability/qk_sigma1_max": 2.0 * seed}
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


def test_report_names_methods_and_compares_with_warmup(tmp_path):
    runs = tmp_path / "runs"
    _fake_run(runs / "w1", "warmup_free_adamw_warmup", 1, [9.0] * 6, 4.0, 1.0)
    _fake_run(runs / "w2", "warmup_free_adamw_warmup", 2, [9.0] * 6, 4.2, 1.1)
    _fake_run(runs / "q1", "warmup_free_quack", 1, [9.0] * 5 + [30.0, 8.0], 4.4, 0.3)
    _fake_run(runs / "s1", "warmup_free_spectral", 1, [9.0] * 6, 3.9, 0.7)
    _fake_run(runs / "a2", "warmup_free_adamw", 2, [9.0] * 6 + [40.0], 9.5, 0.1, status="diverged")  # listed too
    (runs / "going").mkdir()
    (runs / "going" / "run_info.json").write_text("{}")  # no result.json yet: left out
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPORT), str(runs), "--out", str(out), "--name", "wf"], cwd=ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "wf.json").read_text())
    summary = {r["method"]: r for r in result["summary"]}
    assert set(summary) == {"adamw", "adamw + warmup", "quack", "spectral τ=0.05"}
    assert summary["adamw + warmup"]["mean"] == pytest.approx(4.1)
    assert summary["quack"]["vs_warmup"] == pytest.approx(4.4 / 4.1 - 1)
    quack = next(r for r in result["runs"] if r["run"] == "q1")
    assert quack["max_train_loss_after_step5"] == 30.0 and quack["min_attention_entropy"] == 0.3
    assert "| 0.01 | quack | 4.400 | 4.400 | +7.3% |" in proc.stdout
    diverged = next(r for r in result["runs"] if r["run"] == "a2")
    assert diverged["status"] == "diverged" and diverged["max_train_loss_after_step5"] == 40.0
    assert summary["adamw"]["val_loss"] == [9.5] and "| a2 | diverged | 9.500 | 40.00 | 0.10 |" in proc.stdout
