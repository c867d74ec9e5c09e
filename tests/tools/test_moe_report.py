"""tools/experiments/moe_report.py on synthetic run folders: arms from configs, β and γ chosen apart on tuning seeds
only, reported arms paired against aux only, routing by source per layer, experts ranked by load, outputs."""

import json

import pytest

from tools.experiments import moe_report

pytestmark = pytest.mark.usefixtures("committed_checkout")
SOURCES = ("code", "tests")
LOADS = (0.4, 0.3, 0.2, 0.1)  # expert shares of one layer, busiest first


def fake_run(folder, seed: int, ortho: float = 0.0, var: float = 0.0, val: float = 5.0, purity: float = 0.6,
             overlap: float = 0.4, experts: int = 4, status: str = "completed", shift: int = 0) -> None:
    """A run folder as keel writes one: 40 steps, router statistics every 10, evaluations at 20 and 40 with
    validation per source and routing by source for MoE layers 1 and 2. `shift` rotates which expert
    index carries which load (expert indices are arbitrary between seeds)."""
    moe = {"num_experts": experts, "ortho_loss": ortho, "var_loss": var}
    val_sets = [{"name": s, "path": f"v/{s}"} for s in SOURCES]
    config = {"seed": seed, "model": {"moe": moe}, "data": {"val_sets": val_sets}}
    info = {"config": config, "command": f"pretrain/main.py seed={seed}", "git_revision": "abc123", "device": "cpu",
            "dtype": "float32", "versions": {"torch": "2", "megatron_core": "0.19.2"},
            "validation": {k: {"digest": f"d-{k}", "tokens": 2048} for k in ("val_loss", "val_loss/code", "val_loss/tests")}}
    folder.mkdir(parents=True)
    (folder / "run_info.json").write_text(json.dumps(info))
    (folder / "result.json").write_text(json.dumps({"status": status}))
    rows = []
    for step in (10, 20, 30, 40):
        row = {"step": step, "loss": 5.0}
        if experts:
            for layer in (1, 2):
                row |= {f"moe/layer{layer}/overlap": overlap + 0.01 * layer, f"moe/layer{layer}/maxvio": 1.0,
                        f"moe/layer{layer}/routing_var": 0.004}
                row |= {f"moe/layer{layer}/load/{(e + shift) % experts}": LOADS[e] for e in range(experts)}
            row |= {"moe/overlap": overlap + 0.015, "moe/maxvio": 1.0, "moe/routing_var": 0.004}
        if step in (20, 40):
            final = step == 40
            row |= {"val_loss": val + (0 if final else 1), "val_loss/code": val - 0.5, "val_loss/tests": val + 0.5}
            if experts:
                p = purity if final else 0.5
                row |= {"moe/purity": p, "moe/purity/code": p + 0.1, "moe/purity/tests": p - 0.1,
                        "moe/source_nmi": p - 0.5}
                for layer in (1, 2):
                    row |= {f"moe/layer{layer}/purity": p + 0.1 * (layer - 1.5),
                            f"moe/layer{layer}/source_nmi": p - 0.5}
                    row |= {f"moe/layer{layer}/routed/{s}/{(e + shift) % experts}": LOADS[e]
                            for s in SOURCES for e in range(experts)}
        rows.append(row)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _experiment(root):
    """Tuning, each loss alone: β = 0.1 wins inside its grid on seeds 100-101 (β = 1 would win on seed 1), γ =
    0.02 at its grid's lower edge. Reported: aux only and β = γ = 0.1 on seeds 1-3, purity up by 0.1, 0.12, 0.08
    and validation loss up by 0.01, -0.01, 0.03."""
    for seed in (100, 101):
        for beta, val in ((0.01, 4.3), (0.1, 4.2), (1.0, 4.4)):
            fake_run(root / "tune" / f"b{beta}-s{seed}", seed, ortho=beta, val=val + 0.01 * (seed - 100))
        for gamma, val in ((0.02, 4.25), (0.08, 4.35), (0.32, 4.5)):
            fake_run(root / "tune" / f"g{gamma}-s{seed}", seed, var=gamma, val=val)
    for seed, (dv, dp) in zip((1, 2, 3), ((0.01, 0.1), (-0.01, 0.12), (0.03, 0.08))):
        fake_run(root / "arms" / f"aux-s{seed}", seed, val=4.0 + 0.1 * seed, purity=0.6, shift=seed)
        fake_run(root / "arms" / f"spec-s{seed}", seed, 0.1, 0.1, val=4.0 + 0.1 * seed + dv, purity=0.6 + dp,
                 overlap=0.1)
    fake_run(root / "arms" / "spec1-s1", 1, 1.0, 1.0, val=3.0)  # a reported β = 1 run: chooses nothing
    fake_run(root / "going" / "s2", 2)
    (root / "going" / "s2" / "result.json").unlink()  # still running: left out


def test_beta_and_gamma_are_chosen_apart_on_tuning_seeds_and_arms_are_paired_on_reported_seeds(tmp_path):
    _experiment(tmp_path / "runs")
    fake_run(tmp_path / "pre", 1234, val=5.5, purity=0.55)
    report = moe_report.build([tmp_path / "runs"], tail=0.5, pretrained=tmp_path / "pre")
    beta, gamma = report["tuning"]["ortho_loss"], report["tuning"]["var_loss"]
    assert (beta["chosen"], beta["values"], beta["at_edge"]) == (0.1, [0.01, 0.1, 1.0], False)
    assert beta["arm"] == "aux + ortho (beta=0.1)" and beta["seeds"] == [100, 101]
    assert beta["candidates"]["1"]["val_loss"]["mean"] == pytest.approx(4.405)
    assert (gamma["chosen"], gamma["at_edge"], gamma["arm"]) == (0.02, True, "aux + var (gamma=0.02)")
    # a run with both losses on is no candidate for either: each is tuned alone
    fake_run(tmp_path / "runs" / "tune" / "both-s100", 100, 0.1, 0.02, val=1.0)
    fake_run(tmp_path / "runs" / "tune" / "both-s101", 101, 0.1, 0.02, val=1.0)
    again = moe_report.tuning(moe_report.load_runs(tmp_path / "runs"))
    assert {k: v["chosen"] for k, v in again.items()} == {"ortho_loss": 0.1, "var_loss": 0.02}
    arms = report["arms"]
    spec = "aux + ortho (beta=0.1) + var (gamma=0.1)"
    assert list(arms) == ["aux only", spec, "aux + ortho (beta=1) + var (gamma=1)"]  # reported seeds only
    assert arms["aux only"]["val_loss"]["values"] == pytest.approx([4.1, 4.2, 4.3])
    assert arms["aux only"]["val_loss/code"]["mean"] == pytest.approx(3.7)
    assert arms[spec]["purity/tests"]["values"] == pytest.approx([0.6, 0.62, 0.58])
    assert arms[spec]["layer2/purity"]["mean"] == pytest.approx(0.75) and arms[spec]["layer1/source_nmi"]["n"] == 3
    # router statistics: the mean of the last half of the logged steps (the same values here)
    assert arms["aux only"]["layer2/overlap"]["mean"] == pytest.approx(0.42)
    assert arms[spec]["overlap"]["mean"] == pytest.approx(0.115)
    pairs = report["paired_vs_aux_only"][spec]
    assert pairs["val_loss"]["diffs"] == pytest.approx([0.01, -0.01, 0.03])
    assert pairs["val_loss"]["verdict"] == "inconclusive"  # covers 0, and not within ±LOSS_MARGIN either
    assert pairs["val_loss"]["equivalence"]["margin"] == moe_report.LOSS_MARGIN and "equivalence" not in pairs["purity"]
    assert pairs["purity"]["diffs"] == pytest.approx([0.1, 0.12, 0.08]) and pairs["purity"]["verdict"] == "higher"
    lo, hi = pairs["purity"]["interval95"]
    assert 0 < lo < pairs["purity"]["mean"] < hi and pairs["purity"]["mean"] == pytest.approx(0.1)
    assert pairs["overlap"]["verdict"] == "lower"
    one_seed = report["paired_vs_aux_only"]["aux + ortho (beta=1) + var (gamma=1)"]["val_loss"]
    assert one_seed["verdict"] == "one seed: no interval"
    assert report["pretrained"]["step"] == 40 and report["pretrained"]["metrics"]["purity"] == 0.55
    assert report["val_digests"] == {k: [f"d-{k}"] for k in ("val_loss", "val_loss/code", "val_loss/tests")}
    prov = report["provenance"]
    assert prov["runs"] == 12 + 7 + 1 and prov["device"] == "cpu" and prov["dtype"] == "float32"
    assert prov["validation"]["val_loss/code"] == {"digests": ["d-val_loss/code"], "tokens": [2048]}


def test_report_writes_json_with_provenance_and_figures(tmp_path, capsys):
    _experiment(tmp_path / "runs")
    fake_run(tmp_path / "pre", 1234, val=5.5)
    out = tmp_path / "out"
    assert moe_report.main([str(tmp_path / "runs"), "--pretrained", str(tmp_path / "pre"), "--out", str(out)]) == 0
    result = json.loads((out / "moe.json").read_text())
    assert result["provenance"]["git_revision"] and result["provenance"]["commands"]
    assert set(result["figures"]) == {"curves", "paired", "load_heatmap", "source_routing"}
    for name in result["figures"].values():
        assert (out / name).stat().st_size > 1000
    assert "_runs" not in result and result["sources"] == ["code", "tests"]
    printed = capsys.readouterr().out
    assert "| aux only | 3 | 4.2000 ± 0.1000 | 3.7000 ± 0.1000 |" in printed
    assert "β (ortho_loss) chosen on tuning seeds [100, 101] from 0.01, 0.1, 1: 0.1\n" in printed
    assert "γ (var_loss) chosen on tuning seeds [100, 101] from 0.02, 0.08, 0.32: 0.02 (at the edge" in printed
    assert "val_loss +0.0100 [" in printed and "interval covers 0" in printed


def test_experts_are_averaged_by_load_rank_never_by_index():
    # two seeds whose experts carry the same loads under different indices
    seeds = [[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]
    ranked = moe_report.ranked_mean([[s] for s in seeds], [moe_report.by_load(s) for s in seeds])
    assert ranked == [pytest.approx([0.4, 0.3, 0.2, 0.1])]  # by index it would be 0.25 everywhere
    # a [sources, experts] matrix follows its experts' total load over both sources
    m = [[0.0, 0.5, 0.5], [0.2, 0.7, 0.1]]
    assert moe_report.ranked_mean([m], [moe_report.by_load([sum(c) for c in zip(*m)])]) == [[0.5, 0.5, 0.0],
                                                                                             [0.7, 0.1, 0.2]]


def test_the_old_from_scratch_runs_still_report(tmp_path):
    # aux only, a specialisation arm and the dense baseline on seeds 1-2, no tuning runs, no sources
    for seed in (1, 2):
        fake_run(tmp_path / f"aux{seed}", seed, val=5.0 + 0.1 * seed)
        fake_run(tmp_path / f"spec{seed}", seed, 0.1, 0.1, val=5.1 + 0.1 * seed)
        fake_run(tmp_path / f"dense{seed}", seed, experts=0, val=4.9 + 0.1 * seed)
    report = moe_report.build([tmp_path], tail=0.2)
    assert report["tuning"] is None and report["pretrained"] is None
    assert set(report["arms"]["dense"]) == {"val_loss", "val_loss/code", "val_loss/tests"}
    assert report["paired_vs_aux_only"]["dense"]["val_loss"]["diffs"] == pytest.approx([-0.1, -0.1])


def test_report_problems_are_one_line_and_exit_2(tmp_path, capsys):
    assert moe_report.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no completed runs" in err and not (tmp_path / "out").exists()
    fake_run(tmp_path / "tune" / "s100", 100, 0.1, 0.1)  # tuning seeds only: nothing to report
    assert moe_report.main([str(tmp_path / "tune"), "--out", str(tmp_path / "out")]) == 2
    assert "has a reported seed" in capsys.readouterr().err
    fake_run(tmp_path / "arms" / "s1", 1)
    bad = [str(tmp_path / "arms"), "--pretrained", str(tmp_path / "nope"), "--out", str(tmp_path)]
    assert moe_report.main(bad) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no finished run" in err


def test_curves_take_the_runs_own_step_0_over_the_pretrained_runs_last_value():
    from pathlib import Path

    from tools.experiments.runs import Run

    def run(rows):
        return Run("r", Path("."), {}, "completed", rows, {})

    later = [run([{"step": 5, "val_loss": 3.0}]), run([{"step": 5, "val_loss": 3.2}])]
    assert moe_report.band(later, "val_loss", start=4.0)["step"] == [0, 5]  # the pretrained model's, prepended
    own = [run([{"step": 0, "val_loss": 4.1}, {"step": 5, "val_loss": 3.0}]),
           run([{"step": 0, "val_loss": 4.1}, {"step": 5, "val_loss": 3.2}])]
    band = moe_report.band(own, "val_loss", start=4.0)
    assert band["step"] == [0, 5] and band["mean"][0] == 4.1  # init_from's step-0 validation, not prepended again
