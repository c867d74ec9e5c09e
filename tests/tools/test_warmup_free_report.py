"""tools/experiments/warmup_free_report.py on synthetic run folders: choices on tuning seeds, the reported
grid paired against warmup, each method's best and highest stable rate."""

import dataclasses
import json

import pytest

from tests.helpers import COMMIT
from tools.experiments import warmup_free_report

pytestmark = pytest.mark.usefixtures("committed_checkout")
FLAT, SPIKE = [9.0, 8.0, 7.0, 6.0, 5.5, 5.0, 4.8], [9.0, 8.0, 7.0, 6.0, 5.5, 5.0, 30.0, 6.0]


def _fake_run(folder, preset: str, seed: int, lr: float, losses: list[float], val: float, status="completed",
              overrides=(), digest="one-set"):
    from pretrain.config import compose_config

    cfg = compose_config([f"+experiment={preset}", f"seed={seed}", f"optim.lr={lr}", *overrides])
    folder.mkdir(parents=True)
    validation = {"val_loss": {"digest": digest, "tokens": 131072}} if digest else {}  # None: from before digests
    (folder / "run_info.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "validation": validation,
                                                      "git_revision": COMMIT}))
    (folder / "result.json").write_text(json.dumps({"status": status}))
    rows = [{"step": i + 1, "loss": loss} for i, loss in enumerate(losses)]
    rows[-1] |= {"val_loss": val, "stability/attn_entropy_min": 0.5, "stability/qk_sigma1_max": 2.0}
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


def _report(runs, out, capsys) -> tuple[int, str, str]:
    """The report's exit code, stdout and stderr."""
    code = warmup_free_report.main([str(runs), "--out", str(out), "--name", "wf"])
    printed = capsys.readouterr()
    return code, printed.out, printed.err


def test_report_chooses_on_tuning_seeds_and_pairs_reported_seeds_against_warmup(tmp_path, capsys):
    runs = tmp_path / "runs"
    # tuning seed 100 at 1e-2: warmup 60 beats 30, τ 0.1 beats 0.05; spectral τ 0.05 would win on seed 1
    _fake_run(runs / "t-w30", "warmup_free_adamw_warmup", 100, 1e-2, FLAT, 4.5, overrides=["lr.warmup_steps=30"])
    _fake_run(runs / "t-w60", "warmup_free_adamw_warmup", 100, 1e-2, FLAT, 4.3)
    _fake_run(runs / "t-s05", "warmup_free_spectral", 100, 1e-2, FLAT, 4.4, overrides=["optim.spectral.tau=0.05"])
    _fake_run(runs / "t-s10", "warmup_free_spectral", 100, 1e-2, FLAT, 4.2, overrides=["optim.spectral.tau=0.1"])
    _fake_run(runs / "r-s05", "warmup_free_spectral", 1, 1e-2, FLAT, 3.0, overrides=["optim.spectral.tau=0.05"])
    # reported seeds 1-3: warmup 60 and spectral τ=0.1 at two rates, AdamW without warmup spikes at 3e-2
    for seed, shift in ((1, 0.0), (2, 0.1), (3, 0.05)):
        for lr, base in ((1e-2, 4.0), (3e-2, 4.2)):
            _fake_run(runs / f"w-{lr}-{seed}", "warmup_free_adamw_warmup", seed, lr, FLAT, base + shift)
            _fake_run(runs / f"s-{lr}-{seed}", "warmup_free_spectral", seed, lr, FLAT, base - 0.1 + shift,
                      overrides=["optim.spectral.tau=0.1"])
        _fake_run(runs / f"a-1e-2-{seed}", "warmup_free_adamw", seed, 1e-2, FLAT, 4.1 + shift + 0.01 * seed)
        _fake_run(runs / f"a-3e-2-{seed}", "warmup_free_adamw", seed, 3e-2, SPIKE, 5.0 + shift,
                  status="diverged" if seed == 3 else "completed")
    (runs / "going").mkdir()
    (runs / "going" / "run_info.json").write_text("{}")  # no result.json yet: left out
    code, printed, err = _report(runs, tmp_path / "out", capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "out" / "wf.json").read_text())
    assert result["chosen"] == {"lr": 0.01, "seeds": [100], "warmup": "adamw + warmup 60",
                                "spectral": "spectral τ=0.1"}
    grid = {(r["lr"], r["method"]): r for r in result["grid"]}
    assert grid[0.01, "spectral τ=0.05"]["seeds"] == [1]  # reported beside the others, but it chose nothing
    spectral = grid[0.01, "spectral τ=0.1"]
    assert spectral["seeds"] == [1, 2, 3] and spectral["vs_warmup"]["diffs"] == pytest.approx([-0.1] * 3)
    assert grid[0.03, "adamw"]["stable_seeds"] == 0 and grid[0.01, "adamw"]["stable_seeds"] == 3
    adamw_diffs = grid[0.01, "adamw"]["vs_warmup"]
    assert adamw_diffs["diffs"] == pytest.approx([0.11, 0.12, 0.13]) and adamw_diffs["verdict"] == "higher"
    methods = result["methods"]
    assert methods["adamw"].pop("best_vs_warmup_best")["diffs"] == pytest.approx([0.11, 0.12, 0.13])  # both at 1e-2
    assert methods["adamw"] == {"best_lr": 0.01, "best_mean": pytest.approx(4.17), "highest_stable_lr": 0.01,
                                "best_val_loss": pytest.approx([4.11, 4.22, 4.18]), "lrs": [0.01, 0.03]}
    assert methods["adamw + warmup 60"]["highest_stable_lr"] == 0.03
    assert methods["spectral τ=0.1"]["best_vs_warmup_best"]["mean"] == pytest.approx(-0.1)
    assert (tmp_path / "out" / "wf.png").stat().st_size > 0
    assert "| 0.03 | adamw | 5.000, 5.100, 5.050 | 5.050 | 0/3 |" in printed
    assert "chosen on tuning seeds [100] at lr 0.01: adamw + warmup 60, spectral τ=0.1" in printed


def test_runs_that_scored_different_validation_text_are_refused(tmp_path, capsys):
    runs = tmp_path / "runs"
    _fake_run(runs / "w", "warmup_free_adamw_warmup", 1, 1e-2, FLAT, 4.3)
    _fake_run(runs / "s", "warmup_free_spectral", 1, 1e-2, FLAT, 4.2, digest="from-a-cpu-trial")
    code, _, err = _report(runs, tmp_path / "out", capsys)
    assert code == 2 and err.count("\n") == 1 and not (tmp_path / "out").exists()
    assert "different validation sets: val_loss (2 different texts)" in err


def test_a_run_that_recorded_no_digest_of_its_validation_text_is_refused(tmp_path, capsys):
    runs = tmp_path / "runs"
    _fake_run(runs / "w", "warmup_free_adamw_warmup", 1, 1e-2, FLAT, 4.3)
    _fake_run(runs / "s", "warmup_free_spectral", 1, 1e-2, FLAT, 4.2, digest=None)
    code, _, err = _report(runs, tmp_path / "out", capsys)
    assert code == 2 and err.count("\n") == 1 and not (tmp_path / "out").exists()
    assert f"{runs / 's'} scored val_loss but its run_info.json records no digest of that text" in err


def test_reported_seeds_never_make_a_choice(tmp_path, capsys):
    runs = tmp_path / "runs"
    _fake_run(runs / "w60", "warmup_free_adamw_warmup", 100, 1e-2, FLAT, 4.3)
    _fake_run(runs / "w60-1", "warmup_free_adamw_warmup", 1, 1e-2, FLAT, 4.3)
    _fake_run(runs / "s1", "warmup_free_spectral", 1, 1e-2, FLAT, 4.0)  # only on a reported seed: nothing to choose
    code, printed, err = _report(runs, tmp_path / "out", capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "wf.json").read_text())["chosen"]["spectral"] is None
