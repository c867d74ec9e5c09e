"""What tools/experiments/ shares, against hand-computed numbers: paired seeds, their t interval and their
equivalence test (TOST), summaries, tables, runs read from folders and grouped into arms, and the provenance
every results JSON needs."""

import json
import math
import threading

import pytest

from tests.helpers import COMMIT
from tools.experiments import ExperimentError, cli, provenance, seeds, stages, stats, tables
from tools.experiments.runs import by_arm, load_runs, per_seed
from tools.experiments.stats import paired, summarize
from tools.experiments.tables import markdown_table

T2 = 4.302652729911275  # Student t, 2 degrees of freedom, two-sided 95% (tables: 4.303)
T2_90 = 2.919985580355516  # two-sided 90% (tables: 2.920): TOST's interval at alpha 0.05


def t2_cdf(t: float) -> float:
    """Student t's CDF at 2 degrees of freedom, in closed form: 1/2 + t / (2 sqrt(2 + t^2))."""
    return 0.5 + t / (2 * math.sqrt(2 + t * t))


@pytest.mark.parametrize("confidence, df, table", [(0.95, 1, 12.7062), (0.95, 2, 4.3027), (0.95, 5, 2.5706),
                                                   (0.95, 30, 2.0423), (0.99, 10, 3.1693), (0.90, 4, 2.1318)])
def test_t_quantile_matches_the_tables(confidence, df, table):
    assert stats.t_quantile(confidence, df) == pytest.approx(table, abs=1e-4)


def test_paired_differences_whose_interval_covers_zero_show_no_difference():
    # diffs 0.1, 0.3, 0.2: mean 0.2, sample std 0.1, half-width t(2) * 0.1 / sqrt(3) = 0.248414
    p = paired({1: 5.0, 2: 5.2, 3: 5.1}, {1: 5.1, 2: 5.5, 3: 5.3})
    assert p.seeds == (1, 2, 3) and p.diffs == pytest.approx((0.1, 0.3, 0.2)) and p.mean == pytest.approx(0.2)
    assert p.interval == pytest.approx((0.2 - T2 * 0.1 / math.sqrt(3), 0.2 + T2 * 0.1 / math.sqrt(3)))
    assert p.interval == pytest.approx((-0.048414, 0.448414), abs=1e-6)
    assert p.covers_zero and p.verdict() == "interval covers 0"  # no difference shown, and no equality either


def test_paired_differences_away_from_zero_are_higher_or_lower():
    # diffs 0.2, 0.3, 0.25: mean 0.25, std 0.05, half-width 0.124207 -> (0.125793, 0.374207)
    a, b = {1: 1.0, 2: 2.0, 3: 3.0}, {1: 1.2, 2: 2.3, 3: 3.25}
    up = paired(a, b)
    assert up.interval == pytest.approx((0.125793, 0.374207), abs=1e-6)
    assert not up.covers_zero and up.verdict() == "higher"
    down = paired(b, a)
    assert down.mean == pytest.approx(-0.25) and down.verdict() == "lower" and not down.covers_zero


def test_only_shared_seeds_are_paired_and_one_pair_has_no_interval():
    p = paired({1: 3.0, 2: 3.5, 4: 9.0}, {2: 3.25, 3: 1.0})
    assert p.seeds == (2,) and p.diffs == (-0.25,) and p.interval is None
    assert not p.covers_zero and p.verdict() == "one seed: no interval"
    assert p.equivalence(1.0) is None and p.verdict(margin=1.0) == "one seed: no interval"


def test_tost_shows_equivalence_only_when_the_90_interval_lies_inside_the_margin():
    # diffs 0.1, 0.3, 0.2: mean 0.2, standard error 0.1 / sqrt(3); df 2, where t's CDF has a closed form
    p = paired({1: 5.0, 2: 5.2, 3: 5.1}, {1: 5.1, 2: 5.5, 3: 5.3})
    se = 0.1 / math.sqrt(3)
    wide = p.equivalence(0.5)  # t = (0.2 + 0.5) / se = 12.12 and (0.2 - 0.5) / se = -5.196
    assert wide.p_value == pytest.approx(max(1 - t2_cdf(0.7 / se), t2_cdf(-0.3 / se)), abs=1e-12)
    assert wide.p_value == pytest.approx(0.017549, abs=1e-6) and wide.equivalent
    assert wide.interval == pytest.approx((0.2 - T2_90 * se, 0.2 + T2_90 * se))  # (0.0314, 0.3686) inside ±0.5
    assert p.verdict(margin=0.5) == "equivalent within ±0.5"
    narrow = p.equivalence(0.3)  # the 90% interval reaches 0.3686 > 0.3: equivalence is not shown
    assert narrow.p_value == pytest.approx(t2_cdf(-0.1 / se), abs=1e-12) == pytest.approx(0.112702, abs=1e-6)
    assert not narrow.equivalent and p.verdict(margin=0.3) == "inconclusive"
    assert p.as_dict(margin=0.3)["equivalence"] == {"margin": 0.3, "alpha": 0.05, "p_value": narrow.p_value,
                                                    "interval90": list(narrow.interval), "equivalent": False}
    with pytest.raises(ExperimentError, match="margin must be positive, got 0"):
        p.equivalence(0)


def test_tost_agrees_with_scipys_one_sided_t_tests():
    from scipy import stats

    diffs = [0.012, -0.004, 0.007, 0.001, -0.009, 0.015, 0.003, -0.002, 0.006, 0.004]
    p = paired(dict.fromkeys(range(1, 11), 0.0), dict(zip(range(1, 11), diffs)))
    for margin in (0.005, 0.01, 0.015):
        above = stats.ttest_1samp(diffs, -margin, alternative="greater").pvalue  # H0: mean <= -margin
        below = stats.ttest_1samp(diffs, margin, alternative="less").pvalue  # H0: mean >= +margin
        tost = p.equivalence(margin)
        assert tost.p_value == pytest.approx(max(above, below), rel=1e-9)
        lo, hi = stats.t.interval(0.90, 9, loc=p.mean, scale=stats.sem(diffs))
        assert tost.interval == pytest.approx((lo, hi), rel=1e-9)
        assert tost.equivalent == (-margin < lo and hi < margin)
    assert [p.equivalence(m).equivalent for m in (0.005, 0.01, 0.015)] == [False, True, True]


def test_a_difference_away_from_zero_can_still_lie_inside_the_margin():
    # diffs 0.010, 0.011, 0.012: clearly above 0, and clearly below 0.05
    p = paired({1: 0.0, 2: 0.0, 3: 0.0}, {1: 0.010, 2: 0.011, 3: 0.012})
    assert p.verdict() == "higher" and p.verdict(margin=0.05) == "higher, by less than 0.05"
    assert p.verdict(margin=0.011) == "higher"  # its 90% interval reaches past 0.011
    with pytest.raises(ExperimentError, match=r"share no seed \(seeds \[1\] and \[2\]\)"):
        paired({1: 1.0}, {2: 1.0})


def test_summarize():
    s = summarize([2.0, 2.4, 2.2])
    assert (s["mean"], s["std"], s["spread"]) == pytest.approx((2.2, 0.2, 0.4))
    assert (s["min"], s["max"], s["n"], s["values"]) == (2.0, 2.4, 3, [2.0, 2.4, 2.2])
    assert summarize([5.0])["std"] == 0.0


def test_markdown_table_aligns_the_named_columns():
    table = markdown_table(["arm", "loss"], [["a", "1.00"], ["b", tables.fmt(None)]], align="lr")
    assert table == "| arm | loss |\n| --- | ---: |\n| a | 1.00 |\n| b | — |"


def _run(folder, seed: int, status: str | None, rows: list[dict], arm: str = "x") -> None:
    folder.mkdir(parents=True)
    (folder / "run_info.json").write_text(json.dumps({"config": {"seed": seed, "arm": arm}}))
    if status:
        (folder / "result.json").write_text(json.dumps({"status": status}))
    # keel logs a non-finite value as a string; a killed run leaves a torn last line
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "lo')


def test_runs_are_read_by_status_and_their_metrics_by_step(tmp_path):
    rows = [{"step": 1, "loss": 9.0}, {"step": 2, "loss": "nan"}, {"step": 3, "loss": 7.0, "val_loss": 6.5},
            {"step": 6, "loss": 6.0, "val_loss": 6.0}]
    _run(tmp_path / "a" / "s1", 1, "completed", rows)
    _run(tmp_path / "b", 2, "diverged", [{"step": 1, "loss": 9.0}])
    _run(tmp_path / "c", 3, None, [])  # still going
    (run,) = load_runs(tmp_path)
    assert (run.name, run.seed, run.status) == ("a/s1", 1, "completed")
    assert run.series("loss") == {1: 9.0, 3: 7.0, 6: 6.0}  # the NaN and the torn line are left out
    assert run.values("loss", after=1) == [7.0, 6.0] and run.last("val_loss") == 6.0 and run.last("x") is None
    assert [r.name for r in load_runs(tmp_path, statuses=("completed", "diverged"))] == ["a/s1", "b"]
    with pytest.raises(ExperimentError, match="no completed runs .* below .*nothing; run the experiment first"):
        load_runs(tmp_path / "nothing")


def test_runs_group_into_arms_with_one_run_per_seed(tmp_path):
    for name, seed, arm, val in [("p2", 2, "p", 4.0), ("p1", 1, "p", 5.0), ("q1", 1, "q", 3.0)]:
        _run(tmp_path / name, seed, "completed", [{"step": 1, "val_loss": val}], arm)
    arms = by_arm(load_runs(tmp_path), lambda r: r.config["arm"])
    assert list(arms) == ["p", "q"] and list(arms["p"]) == [1, 2]  # arms as first seen, seeds sorted
    assert per_seed(arms["p"], lambda r: r.last("val_loss")) == {1: 5.0, 2: 4.0}
    assert per_seed(arms["p"], lambda r: r.last("grad_norm")) == {}
    _run(tmp_path / "p1-again", 1, "completed", [{"step": 1, "val_loss": 5.5}], "p")
    with pytest.raises(ExperimentError, match=r"p1 and .*p1-again are both seed 1 of arm 'p'"):
        by_arm(load_runs(tmp_path), lambda r: r.config["arm"])


def test_guarded_turns_a_problem_with_the_runs_into_one_line_and_exit_2(capsys):
    def broken():
        raise ExperimentError("no completed runs below x; run the experiment first")

    assert cli.guarded(broken) == 2 and cli.guarded(lambda: None) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("error: no completed runs below x; run the experiment first\n")


def test_choices_are_made_on_tuning_seeds_and_comparisons_on_reported_seeds(tmp_path):
    for name, seed, arm, val in [("a100", 100, "a", 4.0), ("a101", 101, "a", 4.4), ("b100", 100, "b", 4.1),
                                 ("b101", 101, "b", 4.1), ("b1", 1, "b", 3.0)]:
        _run(tmp_path / name, seed, "completed", [{"step": 1, "val_loss": val}], arm)
    runs = load_runs(tmp_path)
    assert [r.name for r in seeds.tuning_runs(runs)] == ["a100", "a101", "b100", "b101"]
    assert [r.name for r in seeds.reported_runs(runs)] == ["b1"]
    arm = lambda r: r.config["arm"]  # noqa: E731
    # means: a 4.2, b 4.1 -> b, although a holds the single best run
    assert seeds.select(by_arm(seeds.tuning_runs(runs), arm), lambda r: r.last("val_loss")) == "b"
    with pytest.raises(ExperimentError, match=r"candidate 'b' ran seeds \[1\], outside the tuning seeds 100-199"):
        seeds.select(by_arm(runs, arm), lambda r: r.last("val_loss"))
    with pytest.raises(ExperimentError, match=r"seeds \[100\] are tuning seeds: .* pair on seeds 1-99"):
        paired({1: 1.0, 100: 2.0}, {1: 1.5, 100: 2.5})


def test_set_overrides_reach_every_training_run_and_only_those(tmp_path, capsys):
    """--set (e.g. trainer.precision=bf16 on a GPU) goes last on each pretrain/main.py command, where it wins,
    in what a stage launches and in what --dry-run prints; a pack or report command is left as it is."""
    args = cli.driver_parser("doc", ("train",)).parse_args(["--set", "trainer.precision=bf16", "trainer.eval_batches=4"])
    argvs = [["tools/pack.py", "--verify", "x"], ["pretrain/main.py", "-m", "seed=1,2"]]
    stage = stages.TrainingStage(lambda: argvs, lambda: False, lambda: [tmp_path])
    launched = []
    stages.run_stage("train", stage, False, launched.append, args.overrides)
    assert launched == [argvs[0], [*argvs[1], "trainer.precision=bf16", "trainer.eval_batches=4"]]
    capsys.readouterr()
    stages.print_commands("train", stage, args.overrides)
    assert capsys.readouterr().out.splitlines()[1].endswith("seed=1,2 trainer.precision=bf16 trainer.eval_batches=4")
    assert cli.driver_parser("doc", ("train",)).parse_args([]).overrides == []


def test_stage_names_several_stages_in_the_order_given():
    parser = cli.driver_parser("doc", ("pack", "train", "report"))
    assert cli.chosen_stages(parser.parse_args([]), ("pack", "train")) == ("pack", "train")  # all, in order
    assert cli.chosen_stages(parser.parse_args(["--stage", "report", "pack"]), ("pack", "train")) == ("report", "pack")


def test_concurrent_stages_launch_every_multirun_at_once_and_raise_after_all_end(tmp_path):
    """--concurrent: a stage's processes all run at once (each launch here waits until all three have
    started, so one after another would break the barrier), and a failure is raised once every one ended."""
    all_started, ended = threading.Barrier(3, timeout=60), []

    def launch(argv):
        all_started.wait()
        ended.append(argv[2])
        if argv[2] == "seed=2":
            raise ExperimentError("seed 2 failed")

    argvs = [["pretrain/main.py", "-m", f"seed={seed}"] for seed in (1, 2, 3)]
    stage = stages.TrainingStage(lambda: argvs, lambda: False, lambda: [tmp_path])
    args = cli.driver_parser("doc", ("train",)).parse_args(["--concurrent", "--set", "trainer.precision=bf16"])
    with pytest.raises(ExperimentError, match="seed 2 failed"):
        stages.run_stage("train", stage, False, launch, args.overrides, args.concurrent)
    assert sorted(ended) == ["seed=1", "seed=2", "seed=3"]
    assert not cli.driver_parser("doc", ("train",)).parse_args([]).concurrent


def test_git_revision_is_dirty_for_changed_tracked_files_only(tmp_path, monkeypatch):
    """A results JSON's revision: a report's own new plots (untracked) leave it clean, an edited source
    file marks it dirty."""
    import subprocess

    from pretrain.rundir import git_revision

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("commit", "-qm", "code")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / "report.png").write_bytes(b"new output")
    assert git_revision(tmp_path) == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_revision(tmp_path) == head + "+dirty"
    assert git_revision(tmp_path / "missing") == "unknown"
    monkeypatch.setenv("KEEL_REVISION", head)  # a copy without history: the commit its copier names
    assert git_revision(tmp_path / "missing") == head and git_revision(tmp_path) == head + "+dirty"


def _scored_run(folder, seed: int, revision: str | None = COMMIT, recorded=("val_loss", "val_loss/code")) -> None:
    """A finished run that logged val_loss and val_loss/code; `recorded`: the sets its run_info.json has digests of."""
    info = {"config": {"seed": seed}, "validation": {k: {"digest": f"d-{k}", "tokens": 64} for k in recorded}}
    folder.mkdir(parents=True)
    (folder / "run_info.json").write_text(json.dumps(info | ({"git_revision": revision} if revision else {})))
    (folder / "result.json").write_text(json.dumps({"status": "completed"}))
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 2, "val_loss": 5.0, "val_loss/code": 6.0}) + "\n")


def test_results_provenance_records_the_commit_and_each_sets_digest(tmp_path, committed_checkout):
    for seed in (1, 2):
        _scored_run(tmp_path / f"s{seed}", seed)
    origin = provenance.results_provenance(load_runs(tmp_path))
    assert origin["provenance"]["git_revision"] == COMMIT and origin["provenance"]["run_git_revisions"] == [COMMIT]
    assert origin["val_digests"] == {"val_loss": ["d-val_loss"], "val_loss/code": ["d-val_loss/code"]}
    assert origin["provenance"]["validation"]["val_loss/code"] == {"digests": ["d-val_loss/code"], "tokens": [64]}


@pytest.mark.parametrize("run, problem", [
    (dict(revision=COMMIT + "+dirty"), rf"1 run\(s\) were not trained from a commit, e.g. .*s2 \(git revision "
                                       rf"{COMMIT}\+dirty\); rerun them from a committed tree"),
    (dict(revision=None), r"not trained from a commit, e.g. .*s2 \(git revision unrecorded\)"),
    (dict(recorded=("val_loss",)), r"s2 scored val_loss/code but its run_info.json records no digest of that text"),
])
def test_results_provenance_refuses_runs_from_uncommitted_code_or_without_digests(tmp_path, committed_checkout,
                                                                                  run, problem):
    _scored_run(tmp_path / "s1", 1)
    _scored_run(tmp_path / "s2", 2, **run)
    with pytest.raises(ExperimentError, match=problem):
        provenance.results_provenance(load_runs(tmp_path))


def test_results_provenance_refuses_a_report_from_uncommitted_code(tmp_path, monkeypatch):
    from pretrain import rundir

    _scored_run(tmp_path / "s1", 1)
    monkeypatch.setattr(rundir, "git_revision", lambda root=rundir.ROOT: COMMIT + "+dirty")
    with pytest.raises(ExperimentError, match=rf"this checkout is at git revision {COMMIT}\+dirty, not a commit: "
                                              "commit .* a results JSON comes from a committed tree"):
        provenance.results_provenance(load_runs(tmp_path))
    monkeypatch.setattr(rundir, "git_revision", lambda root=rundir.ROOT: "unknown")  # no git at all
    with pytest.raises(ExperimentError, match="git revision unknown, not a commit"):
        provenance.results_provenance(load_runs(tmp_path))
