"""Spike recovery end to end: random-id rows planted where a run reads them at steps 13-15
(tools/plant_spikes.py) make a tiny run drop those updates on the device, rewind to its step-12
checkpoint past the bad rows, and finish; a run killed in the middle of that rewind resumes to the
same result. Also: no host sync of keel's on a step that logs nothing (torch.profiler counts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import MAIN, ROOT, child_env, losses, metrics, run_keel, tiny_overrides

pytestmark = pytest.mark.slow

SEED, BATCH, START, STEPS = 1234, 8, 13, 3  # the smoke preset's seed and global batch
REWIND = ["trainer.max_steps=18", "trainer.eval_interval=6", "checkpoint.keep_last=4", "optim.lr=3e-3",
          "logging.monitors.spike.action=rewind", "logging.monitors.spike.window=16",
          "logging.monitors.spike.min_count=4", "logging.monitors.spike.loss_z=3",
          "logging.monitors.spike.rewind.skips=2", "logging.monitors.spike.rewind.within=10",
          "logging.monitors.spike.rewind.margin=2"]
# a plugin whose callback kills its own process at the rewind, after the checkpoint is reloaded and before
# the event is logged or anything is saved: the middle of a rewind
KILLER = '''
import os, signal
from pretrain.callbacks import Callback, register

@register
class KillAtRewind(Callback):
    name, order = "kill_at_rewind", 50

    def on_rewind(self, trainer, event):
        os.kill(os.getpid(), signal.SIGKILL)
'''


@pytest.fixture(scope="module")
def planted(tiny_data, tmp_path_factory):
    from tools.plant_spikes import plant

    prefix = tmp_path_factory.mktemp("planted") / "train"
    record = plant(tiny_data["train"], prefix, SEED, BATCH, START, STEPS, kind="random")
    return {**tiny_data, "train": str(prefix)}, record


@pytest.fixture(scope="module")
def rewound(planted, tmp_path_factory):
    data, _ = planted
    run = tmp_path_factory.mktemp("rewound") / "run"
    run_keel(tiny_overrides(data, run) + REWIND)
    return run


def _final_state(run: Path) -> dict:
    from pretrain.checkpoint.state import load_state, state_file

    return load_state(state_file(run / "checkpoints" / "step_00000018", 0))["trainer"]


def test_the_planted_rows_are_the_ones_the_run_reads_at_those_steps(planted):
    from data.format import PackedDataset
    from data.loader import PackedLoader

    data, record = planted
    planted_set, clean = PackedDataset(data["train"]), PackedDataset(record["source"])
    changed = [i for i in range(len(clean)) if (planted_set.row(i).tokens != clean.row(i).tokens).any()]
    assert changed == record["rows"] and len(changed) == STEPS * BATCH
    for _, row in PackedLoader(clean, BATCH, BATCH, 0, 1, SEED).rows_of_steps(START, STEPS):
        assert row in record["rows"]
    for _, row in PackedLoader(clean, BATCH, BATCH, 0, 1, SEED).rows_of_steps(1, START - 1):
        assert row not in record["rows"]


def test_a_planted_bad_window_rewinds_skips_the_rows_it_names_and_finishes(rewound):
    rows = metrics(rewound)
    events = [r for r in rows if r.get("event") == "rewind"]
    assert len(events) == 1, events
    e = events[0]
    # dropped at 13 and 14 (two within 10 steps), back to the step-12 checkpoint, data moved to step 16's end
    assert (e["spike_steps"], e["to_step"], e["step"], e["data_steps_skipped"]) == ([13, 14], 12, 12, 4)
    assert e["data_rows_skipped"] == 4 * BATCH and e["loss_z"] > 3
    state = _final_state(rewound)
    assert state["loader"]["consumed"] == 18 * BATCH + e["data_rows_skipped"]  # exactly the rows it says
    assert state["recovery"]["rewinds"] == 1 and state["recovery"]["rows_skipped"] == e["data_rows_skipped"]
    # the rows past the checkpoint were re-run: one row per step, and no loss near the planted rows' ~6.8
    trained = [r for r in rows if "loss" in r and "event" not in r]
    assert [r["step"] for r in trained] == list(range(1, 19))
    assert max(r["loss"] for r in trained if r["step"] > 12) < 6.0
    result = json.loads((rewound / "result.json").read_text())
    assert result["status"] == "completed" and result["rewinds"] == [e]


def test_a_run_killed_in_the_middle_of_a_rewind_resumes_to_the_same_result(planted, rewound, tmp_path):
    data, _ = planted
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "keel_kill_at_rewind.py").write_text(KILLER)
    run, overrides = tmp_path / "run", tiny_overrides(data, tmp_path / "run") + REWIND
    env = child_env() | {"KEEL_PLUGINS": "keel_kill_at_rewind", "PYTHONPATH": f"{plugin}:{ROOT}"}
    killed = subprocess.run([sys.executable, str(MAIN), *overrides], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    # killed in the rewind step 14 started (before its row): the plan is written, the event is not logged
    assert (run / "rewind.json").is_file() and max(losses(run)) == 13
    assert not [r for r in metrics(run) if "event" in r]
    run_keel(overrides)  # resumed without the plugin: it finishes the rewind, then the run
    assert losses(run) == losses(rewound)
    assert [r for r in metrics(run) if "event" in r] == [r for r in metrics(rewound) if "event" in r]
    assert _final_state(run)["loader"] == _final_state(rewound)["loader"]


NOT_KEELS = ("Optimizer.step#", "megatron/core/tensor_parallel/cross_entropy.py")


def _reads(prof) -> int:
    """aten::item / aten::_local_scalar_dense calls in a profile that are keel's (see NOT_KEELS)."""
    def keels(event) -> bool:
        while event is not None:
            if any(name in event.name for name in NOT_KEELS):
                return False
            event = event.cpu_parent
        return True

    return len([e for e in prof.events() if e.name in ("aten::item", "aten::_local_scalar_dense") and keels(e)])


def test_a_step_that_logs_nothing_reads_nothing_on_the_host(megatron_world, tiny_data, tmp_path):
    """Host reads per step under torch.profiler: none of keel's on a step that is not logged (a logged step
    reads its record with one copy, not these). Not counted: reads inside torch's optimizer step (its Adam
    keeps its step count on the CPU and reads it there, whatever the device) and inside megatron's
    vocab-parallel cross entropy (its masked assignment `x[mask] = 0`): neither is keel's."""
    from torch.profiler import ProfilerActivity, profile

    from pretrain.config import compose_config
    from pretrain.run import build_trainer

    cfg = compose_config(tiny_overrides(tiny_data, tmp_path, steps=8) + [
        "trainer.log_interval=4", "trainer.eval_interval=8", "checkpoint.interval=8", "trainer.eval_batches=1"])
    trainer = build_trainer(cfg, megatron_world, tmp_path)
    trainer.callbacks.clear()
    unlogged = []
    for step in (1, 2, 3):
        with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
            trainer.train_step()
        assert not trainer.logs(step)
        unlogged.append(_reads(prof))
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        trainer.evaluate()
    assert unlogged == [0, 0, 0]
    assert _reads(prof) > 0  # the count sees a read: a validation returns a float


def test_the_rewind_rule_counts_dropped_steps_in_its_window_and_plans_the_data_it_skips():
    from pretrain.callbacks.spike import RewindConfig, SpikeConfig
    from pretrain.recovery import Recovery

    recovery = Recovery(SpikeConfig(action="rewind", rewind=RewindConfig(skips=3, within=10, margin=5)))
    calm = {"loss": 2.0, "grad_norm": 1.0, "skipped": 0.0, "nonfinite": 0.0, "loss_z": 0.1, "grad_z": 0.2}
    spike = calm | {"skipped": 1.0, "loss_z": 9.0}
    assert recovery.observe(20, spike) is None and recovery.observe(25, spike) is None
    assert recovery.observe(31, spike) is None  # step 20 has left the 10-step window
    trigger = recovery.observe(33, spike)
    assert trigger["spike_steps"] == [25, 31, 33] and (trigger["first_spike"], trigger["last_spike"]) == (25, 33)
    plan = recovery.plan(trigger, 33, Path("step_00000024"), 24, global_batch=8)
    assert plan["rows"] == (33 + 5 - 24) * 8 and plan["recovery"]["rewinds"] == 1
    # a non-finite step rewinds at once; under another policy nothing ever does
    assert Recovery(SpikeConfig(action="rewind")).observe(3, calm | {"nonfinite": 1.0, "skipped": 1.0})
    assert Recovery(SpikeConfig(action="skip")).observe(3, calm | {"nonfinite": 1.0, "skipped": 1.0}) is None


def test_a_config_saved_with_the_old_spike_keys_still_reads():
    from dataclasses import asdict

    from pretrain.config import compose_config, config_from_dict

    saved = asdict(compose_config([]))
    monitors = saved["logging"]["monitors"]
    del monitors["spike"]
    monitors |= {"spike_window": 60, "spike_z": 5.0, "spike_action": "skip"}
    spike = config_from_dict(saved).logging.monitors.spike
    assert (spike.window, spike.loss_z, spike.action, spike.min_count) == (60, 5.0, "skip", 20)


def test_planting_refuses_to_overwrite_or_to_plant_outside_the_vocabulary(planted, capsys):
    from tools.plant_spikes import main

    data, _ = planted
    args = ["--data", data["train"], "--seed", "1", "--global-batch", "8", "--start", "2"]
    assert main([*args, "--output", data["train"]]) == 2
    assert main([*args, "--output", data["train"] + "_new", "--token", "100000"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "exists; choose a new --output" in errors[0] and "outside the" in errors[1]
