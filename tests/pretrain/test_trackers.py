"""The metrics logger's trackers (pretrain/callbacks/trackers.py) with a fake `wandb` module that records
every call, and the one-line errors of logging.wandb, logging.downstream and trainer.profile. The real W&B
(offline), the in-loop tasks and the profiler run in tests/pretrain/test_train_e2e.py's resume test."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from models.config import ConfigError
from pretrain.callbacks.metrics import MetricsLogger
from pretrain.callbacks.trackers import Wandb, WandbConfig


class FakeRun:
    def __init__(self, **kwargs):
        self.kwargs, self.rows, self.defined, self.finished = kwargs, [], [], False

    def define_metric(self, name, step_metric=None):
        self.defined.append((name, step_metric))

    def log(self, row: dict):
        self.rows.append(row)

    def finish(self):
        self.finished = True


class FakeWandb:
    """What keel calls of the wandb module: init, the run's methods, Image."""

    def __init__(self):
        self.runs: list[FakeRun] = []

    def init(self, **kwargs) -> FakeRun:
        self.runs.append(FakeRun(**kwargs))
        return self.runs[-1]

    class Image:
        def __init__(self, path: str):
            self.path = path


def _train(logger: MetricsLogger, rows: list[dict], start: int = 0) -> None:
    logger.on_train_start(SimpleNamespace(step=start))
    for row in rows:
        logger.on_step_end(None, dict(row))


def test_wandb_gets_config_rows_and_the_loss_plot_and_a_resume_logs_into_the_same_run(tmp_path):
    fake, settings = FakeWandb(), WandbConfig(enabled=True, project="cpt", tags=["code"], mode="offline")
    logger = MetricsLogger(tmp_path, interval=2, trackers=[Wandb(settings, tmp_path, "run-a", {"seed": 7}, fake)])
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5, "spike": 1, "spike_action": "log"},
            {"step": 3, "loss": 2.4, "val_loss": 2.6, "downstream/mc/acc": 0.5}, {"step": 4, "loss": float("nan")}]
    _train(logger, rows)
    (tmp_path / "loss.png").write_bytes(b"png")
    logger.on_train_end(None)
    [run] = fake.runs
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert run.kwargs == {"project": "cpt", "entity": None, "name": "run-a", "tags": ["code"], "mode": "offline",
                          "id": run_id, "resume": "allow", "dir": str(tmp_path), "config": {"seed": 7}}
    assert run.defined == [("*", "step")]  # the row's own step is W&B's x-axis
    # logged as metrics.jsonl is: every 2nd step and every validation; a NaN left out
    assert run.rows[:3] == [{"loss": 2.5, "spike": 1, "spike_action": "log", "step": 2},
                            {"loss": 2.4, "val_loss": 2.6, "downstream/mc/acc": 0.5, "step": 3}, {"step": 4}]
    assert run.rows[3]["loss_plot"].path == str(tmp_path / "loss.png") and run.finished
    assert logger.summary([])["wandb"] == f"run {run_id} ({tmp_path / 'wandb'})"

    # a resumed keel run: the same W&B run, the rows from the checkpoint's step on
    resumed = MetricsLogger(tmp_path, interval=2, trackers=[Wandb(settings, tmp_path, "run-a", {"seed": 7}, fake)])
    _train(resumed, [{"step": 4, "loss": 2.2}], start=3)
    assert fake.runs[1].kwargs["id"] == run_id and fake.runs[1].rows == [{"loss": 2.2, "step": 4}]


def test_a_missing_wandb_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now fails
    with pytest.raises(ConfigError, match=r"^wandb is not installed .*pip install -e '\.\[wandb\]'$"):
        Wandb(WandbConfig(enabled=True), tmp_path, "x", {})


@pytest.mark.parametrize("override, message", [
    ("logging.wandb.mode=cloud", r"logging.wandb.mode='cloud' is unknown; choose one of online, offline"),
    ("trainer.profile.memory_snapshot_step=3", r"memory_snapshot_step=3 needs trainer.profile.start set"),
    ("trainer.profile.steps=0", r"trainer.profile: start=0 must be >= 0 \(0: off\) and steps=0 >= 1"),
    ("logging.downstream.interval=0", r"logging.downstream.interval, batch_size and max_gen_toks must be >= 1"),
])
def test_bad_settings_are_one_line(override, message):
    from pretrain.config import compose_config

    with pytest.raises(ConfigError, match=message):
        compose_config([override])


def test_downstream_refuses_what_it_cannot_run_before_training(tmp_path, megatron_world):
    from pretrain.callbacks import RunContext
    from pretrain.callbacks.downstream import DownstreamEval
    from pretrain.config import compose_config

    def build(*overrides):
        cfg = compose_config(["logging.downstream.tasks=[missing.yaml]", *overrides])
        return DownstreamEval.build(RunContext(cfg, megatron_world, tmp_path, None, None))

    with pytest.raises(ConfigError, match=r"interval=5 must be a multiple of trainer.log_interval=2"):
        build("logging.downstream.interval=5", "trainer.log_interval=2")
    with pytest.raises(ConfigError, match=r"^task file missing.yaml not found; pass an lm-eval task name or the path"):
        build("logging.downstream.interval=4", "trainer.log_interval=2")
    assert DownstreamEval.build(RunContext(compose_config([]), megatron_world, tmp_path, None, None)) is None
