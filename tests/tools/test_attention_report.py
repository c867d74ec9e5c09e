"""tools/experiments/attention_report.py on synthetic run folders: grouping, statistics, model facts, outputs."""

import dataclasses
import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT, child_env

REPORT = ROOT / "tools" / "experiments" / "attention_report.py"
TINY = ["+experiment=attention_quality", "model.hidden_size=64", "model.head_dim=16", "data.vocab_size=256"]


def _fake_run(folder, attention: str, seed: int, val_loss: float, status: str = "completed") -> None:
    from pretrain.config import compose_config

    cfg = compose_config([*TINY, f"attention={attention}", f"seed={seed}"])
    folder.mkdir(parents=True)
    (folder / "run_info.json").write_text(json.dumps({"config": dataclasses.asdict(cfg)}))
    (folder / "result.json").write_text(json.dumps({"status": status}))
    rows = [{"step": 1, "loss": 9.0, "grad_norm": 3.0}, {"step": 2, "loss": 8.0, "grad_norm": 1.0, "val_loss": val_loss}]
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


def test_report_groups_by_type_and_writes_json_and_png(tmp_path):
    runs = tmp_path / "runs"
    for attention, seed, loss in [("gla", 1, 5.0), ("gla", 2, 5.2), ("gqa", 1, 4.9), ("gqa", 2, 4.7)]:
        _fake_run(runs / f"{attention}-s{seed}", attention, seed, loss)
    _fake_run(runs / "mla-s1", "mla", 1, 1.0, status="diverged")  # not completed: left out
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPORT), str(runs), "--out", str(out), "--name", "q"], cwd=ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["attention"]: r for r in json.loads((out / "q.json").read_text())["rows"]}
    assert list(rows) == ["gqa", "gla"]  # keel's type order, the diverged MLA run left out
    assert rows["gla"]["val_loss"] == [5.0, 5.2] and rows["gla"]["mean"] == pytest.approx(5.1)
    assert rows["gla"]["std"] == pytest.approx(0.1414, abs=1e-4) and rows["gqa"]["max_grad_norm"] == [3.0, 3.0]
    # 64/16 = 4 heads of 16: GQA caches 2 kv heads of k and v; GLA 2 latents of 32 plus an 8-wide RoPE key
    assert (rows["gqa"]["kv_elements"], rows["gla"]["kv_elements"]) == (2 * 2 * 16, 2 * 32 + 8)
    assert rows["gla"]["kv_bytes_bf16"] == 2 * rows["gla"]["kv_elements"] and rows["gqa"]["params"] > 0
    assert (out / "q.png").stat().st_size > 0 and "| gla | 0.001 |" in proc.stdout


def test_report_without_completed_runs_says_so(tmp_path):
    proc = subprocess.run([sys.executable, str(REPORT), str(tmp_path), "--out", str(tmp_path / "out")], cwd=ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no completed runs" in proc.stderr
