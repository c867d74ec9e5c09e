"""Downstream tasks in the loop: lm-evaluation-harness tasks scored on the model being trained, every
`interval` steps and at the last step, each task's metrics logged beside the validation loss."""

from __future__ import annotations

import logging
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from models.config import check
from pretrain.callbacks.base import METRICS_ORDER, Callback, RunContext

PREFIX = "downstream/"  # metrics: downstream/TASK/METRIC, and downstream_time_s


@dataclass
class DownstreamConfig:
    """`logging.downstream`: lm-eval tasks (names, or task YAML paths) scored every `interval` steps."""

    tasks: list[str] = field(default_factory=list)  # empty: off
    interval: int = 1000  # a multiple of trainer.log_interval, so that each evaluation's row is logged
    limit: Optional[float] = None  # examples per task (a fraction of each task when below 1); None: all
    num_fewshot: Optional[int] = None  # None: each task's own
    batch_size: int = 8
    max_gen_toks: int = 64  # new tokens for a generation task that names no max_gen_toks

    def __post_init__(self):
        check(self.interval >= 1 and self.batch_size >= 1 and self.max_gen_toks >= 1,
              "logging.downstream.interval, batch_size and max_gen_toks must be >= 1")


@contextmanager
def rng_untouched():
    """Python's, NumPy's and torch's global RNG states as they were: an evaluation in the loop leaves the
    training run exactly as it would be without it."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


class DownstreamEval(Callback):
    """Every rank scores its data-parallel share of the requests (tensor-parallel ranks together); rank 0
    adds each task's metrics to the step's row. The time it takes is `downstream_time_s` in that row: it
    falls outside the step's timing, so tokens_per_s and MFU do not count it."""

    name, order = "downstream", METRICS_ORDER - 10  # adds to the row the metrics logger writes

    @classmethod
    def build(cls, run: RunContext) -> DownstreamEval | None:
        d = run.cfg.logging.downstream
        if not d.tasks:
            return None
        check(run.world.pp == 1 and run.cfg.parallel.expert == 1,
              "logging.downstream needs parallel.pipeline=1 and parallel.expert=1 (lm-eval's requests are not "
              "split into pipeline stages or expert groups); score checkpoints with tools/evaluate.py --tasks")
        check(d.interval % run.cfg.trainer.log_interval == 0,
              f"logging.downstream.interval={d.interval} must be a multiple of trainer.log_interval="
              f"{run.cfg.trainer.log_interval}, so that each evaluation's row is logged")
        return cls(run, d)

    def __init__(self, run: RunContext, settings: DownstreamConfig):
        from megatron.core import parallel_state

        from data.prepare import ensure_tokenizer
        from pretrain.downstream import KeelLM, task_manager  # one line naming the eval extra when it is missing

        self.settings, self.max_steps = settings, run.cfg.trainer.max_steps
        self.manager = task_manager(settings.tasks)  # a missing task file: one line before training starts
        group = parallel_state.get_data_parallel_group() if run.world.dp > 1 else None
        self.lm = KeelLM(run.model, ensure_tokenizer(run.cfg.data), run.cfg.model.max_seq_len, settings.batch_size,
                         settings.max_gen_toks, run.cfg.seed, group)
        self.evaluations, self.seconds = 0, 0.0  # so far, over resumes
        logging.getLogger("lm_eval").setLevel(logging.WARNING)

    def on_step_end(self, trainer, metrics: dict) -> None:
        step = metrics["step"]
        if step % self.settings.interval and step != self.max_steps:
            return
        from models.compile import eager
        from pretrain.downstream import run_tasks

        s = self.settings
        trainer.ddp.eval()
        try:
            with rng_untouched(), eager():
                result = run_tasks(self.lm, s.tasks, s.limit, s.num_fewshot, bootstrap_iters=0, manager=self.manager)
        finally:
            trainer.ddp.train()
        self.evaluations, self.seconds = self.evaluations + 1, self.seconds + result.seconds
        metrics.update(result.metrics(PREFIX))
        metrics["downstream_time_s"] = result.seconds

    def state_dict(self) -> dict:
        return {"evaluations": self.evaluations, "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.evaluations, self.seconds = state["evaluations"], state["seconds"]

    def summary(self, rows: list[dict]) -> dict[str, str]:
        last = next((r for r in reversed(rows) if "downstream_time_s" in r), None)
        if last is None:
            return {"downstream": "no evaluation"}
        scores = ", ".join(f"{k.removeprefix(PREFIX)} {v:.4f}" for k, v in last.items()
                           if k.startswith(PREFIX) and "_stderr" not in k)
        return {"downstream": f"step {last['step']}: {scores} ({self.evaluations} evaluations, {self.seconds:.0f} s)"}
