"""Finished spike-recovery run folders as the spikes presets write them (the config keys and metrics rows that
tools/experiments/spike_experiment.py and spike_report.py read), for their tests: no training."""

from __future__ import annotations

import json

from tests.helpers import COMMIT

ACTIONS = {"spikes_none": "log", "spikes_skip": "skip", "spikes_rewind": "rewind"}


def fake_run(folder, preset: str, seed: int, lr: float = 3e-3, val: float = 4.0, data_path: str | None = None,
             flagged: int = 0, dropped: int = 0, rewinds: tuple[tuple[int, int, list[int]], ...] = (),
             step_time: float = 0.5, steps: int = 10, status: str = "completed", digest: str = "clean-set",
             warmup: int = 0) -> None:
    """`steps` rows with a loss and step time, `flagged` host flags, `dropped` in the final skipped_total, a rewind
    event row per (at_step, to_step, spike_steps), and the final validation loss `val`; `warmup`: lr.warmup_steps."""
    folder.mkdir(parents=True)
    config = {"name": preset, "seed": seed, "optim": {"lr": lr}, "lr": {"warmup_steps": warmup},
              "data": {"path": data_path},
              "logging": {"monitors": {"spike": {"action": ACTIONS[preset]}}}}
    validation = {"val_loss": {"digest": digest, "tokens": 131072}}
    (folder / "run_info.json").write_text(json.dumps({"config": config, "git_revision": COMMIT, "command": "fake",
                                                      "validation": validation}))
    rows = [{"step": i, "loss": 5.0, "step_time_s": step_time, "skipped_total": dropped if i == steps else 0}
            for i in range(1, steps + 1)]
    for i in range(flagged):
        rows[i] |= {"spike": 1, "spike_steps": str(i + 1)}
    events = [{"event": "rewind", "step": to, "rewind": n + 1, "at_step": at, "to_step": to, "spike_steps": spikes,
               "reason": "3 dropped steps within 50", "data_rows_skipped": 16 * (spikes[-1] + 20 - to)}
              for n, (at, to, spikes) in enumerate(rewinds)]
    rows[-1]["val_loss"] = val
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [*events, *rows]) + "\n")
    (folder / "result.json").write_text(json.dumps({"status": status}))
