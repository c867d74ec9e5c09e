"""End to end through `pretrain/main.py`: training, exact resume, parallel equivalence, errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import (MAIN, ROOT, assert_index_admitted, child_env, losses, metrics, resume_folder,
                           run_keel, tiny_overrides)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def downstream(tmp_path_factory) -> list[str]:
    """lm-eval tasks every 2 steps (logging.downstream): 3 examples of each of the tiny tasks (multiple
    choice, generation, rolling log-likelihood; tests/lm_eval_helpers.py)."""
    from tests.lm_eval_helpers import write_tasks

    tasks = write_tasks(tmp_path_factory.mktemp("tasks"))
    return [f"logging.downstream.tasks=[{tasks['mc']},{tasks['gen']},{tasks['rolling']}]",
            "logging.downstream.interval=2", "logging.downstream.limit=3"]


@pytest.fixture(scope="module")
def straight(tiny_data, tmp_path_factory, downstream):
    """One uninterrupted 6-step run, with lm-eval tasks in the loop, shared as the reference of the tests below."""
    run = tmp_path_factory.mktemp("straight") / "run"
    out = run_keel(tiny_overrides(tiny_data, run, steps=6) + downstream +
                   ["logging.plot=true", "logging.tensorboard=true"])
    return run, out


def _downstream_scores(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items() if k.startswith("downstream/")}


def test_smoke_trains_logs_and_checkpoints(straight):
    run, out = straight
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "lr/embedding", "lr/hidden", "lr/norm"):
        assert key in rows[0]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 2 and val[-1] < val[0]
    assert (run / "loss.png").stat().st_size > 0 and any((run / "tensorboard").iterdir())
    assert (run / "checkpoints" / "step_00000006" / "meta.json").exists()
    info = (run / "run_info.json").read_text()
    assert "git_revision" in info and '"hidden_size": 64' in info
    assert "done: step 6/6" in out.stdout


def test_every_seed_scores_the_same_validation_rows(tiny_data, tmp_path, straight):
    other = tmp_path / "seed2"
    run_keel(tiny_overrides(tiny_data, other, steps=3) + ["seed=2"])
    infos = [json.loads((run / "run_info.json").read_text()) for run in (straight[0], other)]
    assert infos[0]["val_digest"] == infos[1]["val_digest"] and len(infos[0]["val_digest"]) == 64
    assert infos[0]["validation"]["val_loss"]["tokens"] == 8 * 64  # eval_batches x global batch x seq_len, all text
    assert infos[0]["versions"]["megatron_core"] == "0.19.2" and infos[0]["dtype"] == "float32"
    assert metrics(other)[0]["loss"] != metrics(straight[0])[0]["loss"]  # the seed did change the run


def test_resume_is_exact_with_downstream_tasks_wandb_and_a_profile(tiny_data, tmp_path, straight, downstream):
    """The split run, like the straight one, scores lm-eval tasks every 2 steps (logging.downstream); it also
    logs to W&B offline and traces step 2 (trainer.profile): none of it changes a loss bit, and each carries
    over the resume."""
    extra = downstream + ["logging.wandb.enabled=true", "logging.wandb.mode=offline", "trainer.profile.start=2",
                          "trainer.profile.steps=1"]
    straight, split = straight[0], tmp_path / "split"
    run_keel(tiny_overrides(tiny_data, split, steps=6) + extra + ["trainer.stop_at=3"])
    assert max(losses(split)) == 3 and (split / "checkpoints" / "step_00000003").exists()
    out = run_keel(tiny_overrides(tiny_data, split, steps=6) + extra)
    assert "resumed from" in out.stdout
    assert losses(split) == losses(straight)  # bit for bit
    # 1. the tasks' metrics in the rows of steps 2, 4 and 6 only, those of the straight run bit for bit; the
    #    time of all three in the summary (the callback's state resumed)
    rows = metrics(split)
    evaluated = [r for r in rows if "downstream_time_s" in r]
    assert [r["step"] for r in evaluated] == [2, 4, 6]
    for r, reference in zip(evaluated, [r for r in metrics(straight) if "downstream_time_s" in r]):
        scores = [r["downstream/keel_mc/acc"], r["downstream/keel_mc/acc_norm"], r["downstream/keel_gen/exact_match"]]
        assert all(0 <= v <= 1 for v in scores) and r["downstream/keel_rolling/word_perplexity"] > 1
        assert _downstream_scores(r) == _downstream_scores(reference) and "tokens_per_s" in r
    assert f"(3 evaluations, {sum(r['downstream_time_s'] for r in evaluated):.0f} s)" in out.stdout
    # 2. W&B: one run id kept in the run folder, both offline parts logged into it, the rows in its files
    run_id = (split / "wandb_run_id").read_text().strip()
    parts = sorted((split / "wandb").glob("offline-run-*"))
    assert len(parts) == 2 and all(p.name.endswith(f"-{run_id}") for p in parts)
    first, second = [(p / f"run-{run_id}.wandb").read_bytes() for p in parts]
    assert b"downstream/keel_mc/acc" in first and b"downstream/keel_mc/acc" in second
    assert json.dumps(rows[0]["loss"]).encode() in first and json.dumps(rows[-1]["val_loss"]).encode() in second
    # 3. the profiler's window: one trace of step 2
    [trace] = (split / "profile").iterdir()
    assert trace.name == "trace_rank0_steps2-2.json" and json.loads(trace.read_text())["traceEvents"]


def test_resume_after_kill_9_is_exact(tiny_data, tmp_path):
    # a long schedule (40 steps) that stops at 6, so the kill always lands before the run could end
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_keel(tiny_overrides(tiny_data, reference, steps=40) + ["trainer.stop_at=6"])
    proc = subprocess.Popen([sys.executable, str(MAIN), *tiny_overrides(tiny_data, killed, steps=40)], cwd=ROOT,
                            env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    # kill as soon as the step-3 checkpoint is published, while later steps are running
    while not (killed / "checkpoints" / "step_00000003").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 3 <= max(losses(killed)) < 40
    run_keel(tiny_overrides(tiny_data, killed, steps=40) + ["trainer.stop_at=6"])
    assert losses(killed) == losses(reference)


def test_incomplete_checkpoint_is_ignored(tiny_data, tmp_path, straight):
    run = resume_folder(straight[0], 3, tmp_path / "run")
    # a crash mid-save leaves only a .tmp folder, which never loads as a checkpoint
    (run / "checkpoints" / "step_00000006.tmp").mkdir()
    out = run_keel(tiny_overrides(tiny_data, run, steps=6))
    assert "resumed from" in out.stdout and "step_00000003" in out.stdout
    assert losses(run) == {step: loss for step, loss in losses(straight[0]).items() if step > 3}


@pytest.mark.parametrize("parallel, rel", [
    (["parallel.tensor=1", "downstream"], 1e-5),  # DP=2, with the straight run's lm-eval tasks at step 2
    # TP=2 alone is test_stability_e2e.py's and test_quack.py's (against one process) and test_reliability.py's
    # (resumed from one process's checkpoint); here it runs with sequence parallelism, below
    (["parallel.pipeline=2"], 1e-4),
    # sequence parallelism on a dense model, and the chunked cross-entropy, vocab-parallel at TP=2, on each
    # rank's half of the sequences (11 chunks of 3 positions of each half × 4 rows)
    (["parallel.tensor=2", "parallel.sequence=true", "model.loss_chunk=24"], 1e-4),
    # DP=2 with the distributed optimizer, 2 micro-batches a rank: each bucket reduced once, during the last
    # backward (without the overlap, the distributed optimizer is test_stability_e2e.py's and test_quack.py's)
    (["parallel.overlap_grad_reduce=true", "optim.distributed=true", "trainer.micro_batch_size=2"], 1e-5),
])
def test_two_processes_match_one(tiny_data, tmp_path, straight, downstream, parallel, rel):
    # the first two steps of the same 6-step schedule (stop_at keeps the schedule)
    with_tasks = "downstream" in parallel
    parallel = [p for p in parallel if p != "downstream"] + (downstream if with_tasks else [])
    two = tiny_overrides(tiny_data, tmp_path / "two", steps=6) + ["trainer.stop_at=2"] + parallel
    run_keel(two, nproc=2)
    assert_index_admitted(tmp_path / "two")  # the allowlist admits this layout's shard index
    one, other = metrics(straight[0])[:2], metrics(tmp_path / "two")
    assert len(other) == 2
    for a, b in zip(one, other):
        assert b["loss"] == pytest.approx(a["loss"], rel=rel)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=rel)
    # the data-parallel ranks shared the tasks' requests; rank 0 logged the scores of one process
    scores = _downstream_scores(other[1])
    assert len(scores) == len(_downstream_scores(one[1])) > 5 if with_tasks else not scores
    assert all(v == pytest.approx(one[1][k], rel=rel) for k, v in scores.items()), (scores, one[1])


def test_distributed_optimizer_resume_is_exact_and_takes_a_new_learning_rate(tiny_data, tmp_path):
    over = ["optim.distributed=true"]
    a = tmp_path / "a"
    run_keel(tiny_overrides(tiny_data, a, steps=5) + over, nproc=2)  # checkpoints after steps 3 and 5
    run_keel(tiny_overrides(tiny_data, resume_folder(a, 3, tmp_path / "b"), steps=5) + over, nproc=2)
    assert losses(tmp_path / "b") == {step: loss for step, loss in losses(a).items() if step > 3}
    # resumed with half the rate (what keel's divergence message advises), at one process: the new rate
    # applies from the next step (megatron's parameter groups are matched without it)
    c = resume_folder(a, 3, tmp_path / "c")
    out = run_keel(tiny_overrides(tiny_data, c, steps=5) + over + ["optim.lr=5e-4"])
    assert "optim.lr is 0.0005, the checkpoint's run had 0.001: the new rate applies from step 4 on" in out.stdout
    rates = {m["step"]: m["lr/hidden"] for m in metrics(a) if "lr/hidden" in m}
    halved = {m["step"]: m["lr/hidden"] for m in metrics(c) if "lr/hidden" in m}
    assert sorted(halved) == [4, 5]
    for step, lr in halved.items():
        assert lr == pytest.approx(rates[step] / 2, rel=1e-12)


def test_document_masking_and_position_reset_train(tiny_data, tmp_path):
    # what the options compute is checked against a hand-built mask in tests/models/test_gpt.py
    run = tmp_path / "run"
    run_keel(tiny_overrides(tiny_data, run, steps=2) + ["data.reset_position_ids=true", "data.document_mask=true"])
    assert all(v == v for v in losses(run).values())


def test_init_from_loads_weights_only(tiny_data, tmp_path, straight):
    pre = straight[0]  # its step-6 checkpoint
    cont = tmp_path / "cont"
    out = run_keel(tiny_overrides(tiny_data, cont, steps=3) + [f"init_from={pre}"])
    assert "initialised weights from" in out.stdout and "step_00000006" in out.stdout
    start, first = metrics(cont)[:2]
    assert first["step"] == 1  # fresh schedule and data position
    # validated before step 1 (trainer.eval_at_start, on for init_from): the loaded weights' own validation
    # loss, which the pretraining run logged at its step 6 on the same validation rows
    assert start["step"] == 0 and "loss" not in start
    assert abs(start["val_loss"] - next(r["val_loss"] for r in metrics(pre) if r["step"] == 6)) < 1e-6
    # step 1's loss is taken before any update: a fresh run of any length has the straight run's
    assert losses(cont)[1] < losses(pre)[1]  # but pretrained weights


def _error_line(proc):
    lines = [line for line in proc.stderr.splitlines() if line.startswith("keel: error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("extra, message", [
    (["parallel.tensor=3"], "does not divide the 4 attention heads"),
    (["+model.hiden_size=128"], "unknown config key model.hiden_size"),
])
def test_config_errors_from_the_command_line(tiny_data, tmp_path, extra, message):
    """The command line's path for a bad config (compose_config before Hydra's own run), for a value keel's checks
    refuse and a key the schema does not have; every bad value's message is test_config.py's, in-process."""
    run = tmp_path / "r"
    assert message in _error_line(run_keel(tiny_overrides(tiny_data, run) + extra, check=False))
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()  # nothing started


def test_input_errors_from_the_command_line(tiny_data, tmp_path):
    missing = run_keel(tiny_overrides(tiny_data, tmp_path / "a") + ["data.path=/nonexistent/train"], check=False)
    assert "not found" in _error_line(missing)
    other_tok = tmp_path / "other.model"
    from data.corpus import stdlib_documents
    from data.tokenizer import train_tokenizer

    train_tokenizer([d.text for _, d in zip(range(40), stdlib_documents("code", "train"))], other_tok, 400)
    mismatch = run_keel(tiny_overrides(tiny_data, tmp_path / "b") + [f"data.tokenizer={other_tok}"], check=False)
    assert "vocabulary" in _error_line(mismatch)
    world = run_keel(tiny_overrides(tiny_data, tmp_path / "c") + ["parallel.tensor=2"], check=False)
    assert "world size 1 is not divisible" in _error_line(world)


def test_incompatible_checkpoint_is_refused(tiny_data, tmp_path, straight):
    run = resume_folder(straight[0], 3, tmp_path / "run")
    proc = run_keel(tiny_overrides(tiny_data, run, steps=6) + ["model.num_layers=4"], check=False)
    assert "incompatible model" in _error_line(proc)


def test_non_finite_steps_are_skipped_then_training_stops(tiny_data, tmp_path):
    run = tmp_path / "run"
    proc = run_keel(tiny_overrides(tiny_data, run, steps=6) + ["optim.lr=1e30", "trainer.max_skipped_steps=2"],
                    check=False)
    assert proc.returncode == 1 and "2 steps in a row had a non-finite loss" in proc.stdout
    rows = metrics(run)
    assert [r.get("skipped", 0) for r in rows] == [0, 1]  # the huge first update poisons the weights
    assert json.loads((run / "result.json").read_text())["status"] == "diverged"


def test_checkpoint_of_the_megatron_0_16_build_is_refused(tiny_data, tmp_path, straight):
    run = resume_folder(straight[0], 3, tmp_path / "run")
    meta_path = run / "checkpoints" / "step_00000003" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["megatron_core"]  # what keel wrote on megatron-core 0.16.1: no release, no manifest
    meta_path.write_text(json.dumps(meta))
    (meta_path.parent / "manifest.json").unlink()
    proc = run_keel(tiny_overrides(tiny_data, run, steps=6), check=False)
    line = _error_line(proc)
    assert proc.returncode == 2 and "megatron-core 0.16.1" in line and "0.19.2" in line
