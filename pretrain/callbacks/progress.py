"""A progress bar (rich) with the loss, learning rate and throughput; validation losses printed."""

from __future__ import annotations

from pretrain.callbacks.base import Callback, Ranks, RunContext


class ProgressBar(Callback):
    """On the terminal (`trainer.progress`)."""

    name, order, ranks = "progress", 110, Ranks.main

    @classmethod
    def build(cls, run: RunContext) -> ProgressBar | None:
        return cls(run.cfg.trainer.max_steps) if run.cfg.trainer.progress else None

    def __init__(self, max_steps: int):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
        self.max_steps = max_steps
        self.task = None

    def on_train_start(self, trainer) -> None:
        self.progress.start()
        self.task = self.progress.add_task("train", total=self.max_steps, completed=trainer.step, info="")

    def on_step_end(self, trainer, metrics: dict) -> None:
        if "loss" not in metrics:  # only a logged step's loss is read on the host
            self.progress.update(self.task, completed=metrics["step"])
            return
        info = f"loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  {metrics['tokens_per_s']:,.0f} tok/s"
        self.progress.update(self.task, completed=metrics["step"], info=info)

    def on_eval(self, trainer, metrics: dict) -> None:
        self.progress.console.print(f"step {metrics['step']}: val_loss {metrics['val_loss']:.4f}")

    def on_start_eval(self, trainer, metrics: dict) -> None:
        self.on_eval(trainer, metrics)

    def on_train_end(self, trainer) -> None:
        self.progress.stop()
