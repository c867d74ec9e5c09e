"""The training loop: megatron-core's forward-backward schedule, keel's optimizer, named callbacks."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from data.loader import PackedLoader, evaluation_batches, model_inputs
from models.builder import BuiltModel
from models.attention.flex import document_block_mask
from models.compile import CompiledLayers, eager, is_compile_error
from optim.optimizer import KeelOptimizer
from optim.schedule import lr_factor
from pretrain.callbacks import Callback
from pretrain.checkpoint import Checkpoints, Snapshot, derive_rng
from pretrain.checkpoint.storage import step_folder
from pretrain.config import KeelConfig
from pretrain.mfu import mfu
from pretrain.recovery import REWIND_FILE, Recovery, StepRecords
from pretrain.rundir import write_json


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row); the message says why."""


class Preempted(RuntimeError):
    """SIGTERM or SIGINT arrived: the step in flight finished and a checkpoint was written."""

    def __init__(self, signum: int, step: int, path: Path):
        super().__init__(f"preempted by {signal.Signals(signum).name} at step {step}; checkpoint {path} written, "
                         "run the same command to resume")
        self.signum = signum
        self.exit_code = 128 + signum  # the shell's convention for "ended by this signal"


@dataclass
class Components:
    """Everything a Trainer runs, built and validated by `pretrain.run.build`."""

    world: object  # pretrain.distributed.World
    built: BuiltModel  # the bare GPT (.gpt: checkpoints, monitors) and its DDP wrapper (.ddp: the schedule)
    optimizer: KeelOptimizer
    train: PackedLoader  # or data.loader.MixedLoader, which blends several sets
    val: PackedLoader  # val_loss
    callbacks: dict[str, Callback]  # by name, in call order
    run_dir: Path
    signature: dict  # the model's shape, checked against every checkpoint
    checkpoints: Checkpoints  # run_dir/checkpoints: saves, loads, what was verified, the save in flight
    val_sets: dict[str, PackedLoader] = field(default_factory=dict)  # more validation sets: val_loss/NAME


def run_schedule(model: torch.nn.Module, forward_step, microbatches: list, seq_length: int, micro_batch_size: int,
                 forward_only: bool) -> list:
    """megatron's forward(-backward) schedule for this world's pipeline layout over `microbatches` (one
    shape): what the forward step's loss function gives for each, or the model's output where the step
    gives no loss function, on the last pipeline stage; nothing on the others."""
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(microbatches), model=[model],
        num_microbatches=len(microbatches), seq_length=seq_length, micro_batch_size=micro_batch_size,
        forward_only=forward_only)


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    """Per-token loss: the schedule sums token losses; finalize_model_grads divides by all tokens."""
    loss_sum = (output.float() * loss_mask).sum()
    tokens = loss_mask.sum().to(torch.int)
    return loss_sum, tokens, {"lm": torch.stack([loss_sum.detach(), tokens.float()])}


class Trainer:
    PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # Slurm's and Kubernetes' warning, and Ctrl-C

    def __init__(self, cfg: KeelConfig, parts: Components):
        self.cfg, self.parts = cfg, parts
        self.signal_received: int | None = None
        self._pid = os.getpid()  # a process forked from this one (megatron's async writer) inherits the handler
        self.checkpoints = parts.checkpoints
        self.world, self.optimizer, self.loader, self.callbacks = parts.world, parts.optimizer, parts.train, parts.callbacks
        self.model, self.ddp = parts.built.gpt, parts.built.ddp  # the bare GPT and its DDP wrapper
        self.flops_per_token = parts.built.flops_per_token(cfg.data.seq_len)
        self.step = 0
        self.skipped_in_row = 0  # non-finite steps in a row (trainer.max_skipped_steps stops the run)
        self.skipped_total = 0  # dropped updates
        self.records = StepRecords()  # each step's device record, read late (pretrain.recovery)
        self.recovery = Recovery(cfg.logging.monitors.spike)
        self.optimizer.use_skip_rule(cfg.logging.monitors.spike.skip_rule(), self.world.device)
        self.rewound = False  # set by a rewind inside a step: the loop goes on from the checkpoint
        self._unlogged_skips: list[int] = []
        self._flag = None  # the preemption flag reduced over ranks, read a step late
        self.microbatches: list[dict] = []
        # per-layer torch.compile (on by default on a GPU; trainer.compile); None runs eagerly
        self.compiled = CompiledLayers(self.model.decoder.layers) if cfg.trainer.compile_on(self.world.device) else None
        self._in_reference = False  # inside reference_forward

    # ---- one step -----------------------------------------------------------------------------
    def train_step(self) -> dict | None:
        """One step with no host sync of keel's: the loss, the gradient norm and the skip decision stay
        on the device (`KeelOptimizer.step`); the host reads them on logged steps, or a step late."""
        t0 = time.perf_counter()
        self._call("on_step_start")
        # 1. this step's learning rate, per parameter group (lowered for a while after a rewind)
        lrs = self.optimizer.set_lr(lr_factor(self.step, self.cfg.trainer.max_steps, self.cfg.lr)
                                    * self.recovery.lr_scale(self.step))
        # 2. forward and backward over this rank's micro-batches; grads reduced over DP
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.microbatches = self.loader.next_global_batch()  # kept for monitors
        loss = self._run_schedule(self.microbatches, forward_only=False)
        self._call("on_before_update", loss)
        # 3. clip and update on the device; a non-finite loss or gradient, or a spike by the skip rule,
        #    drops the update there (the step still counts)
        record = self.optimizer.step(loss)
        self.step += 1
        self.records.put(self.step, record)
        return self._metrics(lrs, t0)

    def _call(self, hook: str, *args) -> list:
        return [getattr(c, hook)(self, *args) for c in self.callbacks.values()]

    def _run_schedule(self, microbatches: list[dict], forward_only: bool) -> torch.Tensor:
        """Global mean token loss over every micro-batch of every data-parallel rank (0-dim, on the device)."""
        try:
            results = self._schedule(microbatches, forward_only)
        except Exception as e:
            # compilation runs inside the first forward and backward: on a compile error every layer goes
            # back to eager (one warning) and the same micro-batches run again from clean gradients
            if not (self.compiled and self.compiled.active and is_compile_error(e)):
                raise
            self.compiled.fall_back(e)
            self.ddp.zero_grad_buffer()
            results = self._schedule(microbatches, forward_only)
        totals = torch.zeros(2, dtype=torch.float64, device=self.world.device)
        last_stage_tp0 = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
        if last_stage_tp0:
            for r in results:
                totals += r["lm"].to(totals)
        dist.all_reduce(totals)
        return totals[0] / totals[1].clamp(min=1)

    def _schedule(self, microbatches: list[dict], forward_only: bool) -> list[dict]:
        return run_schedule(self.ddp, self._forward_step, microbatches, self.cfg.data.seq_len,
                            self.cfg.trainer.micro_batch_size, forward_only)

    @property
    def forward_is_plain(self) -> bool:
        """Whether the training forward is the eager model's: no compiled layers, no chunked loss."""
        return not (self.compiled and self.compiled.active) and not self.model.loss_chunk_tokens

    def reference_forward(self, microbatch: dict) -> None:
        """One forward-only pass over `microbatch` as the plain eager model computes it: compiled layers
        run eagerly and the loss is not chunked. The stability monitors capture their inputs in it."""
        self._in_reference = True
        try:
            with torch.no_grad(), eager(), self.model.plain_loss():
                self._schedule([microbatch], forward_only=True)
        finally:
            self._in_reference = False

    @property
    def block_masks(self) -> bool:
        """Whether document masks go to FlexAttention: it needs compiled layers and, for its backward, a
        GPU; the reference pass keeps the dense mask, which the monitors' entropy reads."""
        compiled = bool(self.compiled and self.compiled.active)
        return compiled and self.world.device.type == "cuda" and not self._in_reference

    def _forward_step(self, data_iterator, ddp):
        """megatron's forward step: one micro-batch through the DDP wrapper it passes (`self.ddp`)."""
        d, rows = self.cfg.data, next(data_iterator)
        blocks = d.document_mask and self.block_masks
        batch = model_inputs(rows, d.reset_position_ids, d.document_mask and not blocks)
        batch = {k: (v.to(self.world.device) if v is not None else None) for k, v in batch.items()}
        if blocks:  # documents as FlexAttention tiles, not a dense [b, 1, s, s] mask
            batch["attention_mask"] = document_block_mask(rows["doc_ids"].to(self.world.device))
        output = ddp(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
        return output, partial(_loss_func, batch["loss_mask"])

    # ---- the host's side of each step: read late, account, log ---------------------------------------
    def logs(self, step: int) -> bool:
        """Whether `step` is read at once and logged: the log interval, validations, checkpoints, the end."""
        t, stop = self.cfg.trainer, self.cfg.trainer.stop_at or self.cfg.trainer.max_steps
        return (step % t.log_interval == 0 or step % t.eval_interval == 0 or step % self.cfg.checkpoint.interval == 0
                or step in (t.max_steps, stop))

    def account(self, upto: int) -> dict | None:
        """Read and act on the records of steps <= `upto`: dropped-step counters, the stop rules, the host
        detector (callbacks' `on_step_record`). Returns the newest record read, or None. May rewind."""
        last = None
        for step, record in self.records.take(upto):
            last = {"step": step, **record}
            self._call("on_step_record", step, record)
            if record["skipped"]:
                self.skipped_total += 1
                self._unlogged_skips.append(step)
            self.skipped_in_row = self.skipped_in_row + 1 if record["nonfinite"] else 0
            trigger = self.recovery.observe(step, record)
            if trigger is not None:
                self.rewind(trigger)
                return None
            self._check_stop(step, record)
        return last

    def _check_stop(self, step: int, record: dict) -> None:
        policy = self.cfg.logging.monitors.spike.action
        if record["skipped"] and not record["nonfinite"] and policy == "stop":
            raise TrainingStopped(
                f"stopped at step {step} by logging.monitors.spike.action=stop: loss {record['loss']:.4f} "
                f"(z {record['loss_z']:.1f}), grad norm {record['grad_norm']:.3g} (z {record['grad_z']:.1f}); "
                "see metrics.jsonl")
        if self.skipped_in_row >= self.cfg.trainer.max_skipped_steps:
            raise TrainingStopped(
                f"stopped at step {step}: {self.skipped_in_row} steps in a row had a non-finite loss or "
                "gradient; lower optim.lr, add warmup (lr.warmup_steps) or enable optim.spectral")

    def _metrics(self, lrs: dict, t0: float) -> dict | None:
        """The step's metrics. Only a logged step's carry the loss and gradient norm (read now, a sync);
        any other step's are read a step late, for the counters and the rewind rule. None after a rewind."""
        logged = self.logs(self.step)
        last = self.account(self.step if logged else self.step - 1)
        if self.rewound:
            return None
        dt = time.perf_counter() - t0
        tokens = self.cfg.trainer.global_batch_size * self.cfg.data.seq_len
        m = {"step": self.step, "lr": next(iter(lrs.values())), **lrs, "tokens_per_s": tokens / dt,
             "step_time_s": dt, "skipped_total": self.skipped_total, **self.loader.tokens_seen()}
        if logged and last is not None:
            r = last
            m |= {"loss": r["loss"], "grad_norm": r["grad_norm"]} | ({"skipped": 1} if r["skipped"] else {})
        if self._unlogged_skips:
            m["skipped_steps"] = " ".join(map(str, self._unlogged_skips))
            self._unlogged_skips = []
        utilisation = mfu(tokens / dt, self.flops_per_token, self.world.device, self.world.size)
        if utilisation is not None:
            m["mfu"] = utilisation
        return m

    # ---- evaluation, checkpoints, loop --------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, val: PackedLoader | None = None) -> float:
        """Mean loss over the first eval_batches global batches of `val` (the validation set by default)."""
        self.ddp.eval()
        val = val or self.parts.val
        val.consumed = 0  # the same validation rows every time
        total = torch.zeros((), dtype=torch.float64, device=self.world.device)
        batches = evaluation_batches(len(val.dataset), val.global_batch, self.cfg.trainer.eval_batches)
        for _ in range(batches):
            total += self._run_schedule(val.next_global_batch(), forward_only=True)
        self.ddp.train()
        return float(total) / batches  # a validated step is a logged one: one read

    @property
    def evaluates_at_start(self) -> bool:
        """trainer.eval_at_start, by default on for a run that starts from init_from."""
        at_start = self.cfg.trainer.eval_at_start
        return at_start if at_start is not None else self.cfg.init_from is not None

    def validate(self) -> dict[str, float]:
        """val_loss, then val_loss/NAME for each named set; each callback's `on_eval_set` runs right after
        each set is scored (the MoE statistics take what the routers counted on that set alone)."""
        sets = {"val_loss": self.parts.val, **{f"val_loss/{n}": v for n, v in self.parts.val_sets.items()}}
        out = {}
        for key, val in sets.items():
            out[key] = self.evaluate(val)
            self._call("on_eval_set", key)
        return out

    def state_dict(self) -> dict:
        """Everything a resume needs besides the model and megatron's optimizer: counters, the data
        position, the optimizer's update rule, and each callback's state under its name."""
        return {"step": self.step, "skipped_total": self.skipped_total, "skipped_in_row": self.skipped_in_row,
                "loader": self.loader.state_dict(), "optimizer": self.optimizer.state_dict(),
                "recovery": self.recovery.state_dict(),
                "callbacks": {name: c.state_dict() for name, c in self.callbacks.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.skipped_total = state["skipped_total"]
        self.skipped_in_row = state["skipped_in_row"]
        self.loader.load_state_dict(state["loader"])
        self.optimizer.load_state_dict(state["optimizer"])
        if "recovery" in state:  # a run folder from before spike recovery starts with none
            self.recovery.load_state_dict(state["recovery"])
        for name, c in self.callbacks.items():
            if name in state["callbacks"]:  # rank 0's file writers keep no state on other ranks
                c.load_state_dict(state["callbacks"][name])

    @property
    def layout(self) -> dict:
        """How the model and optimizer are split: a checkpoint resumed at another layout is resharded."""
        w = self.world
        return {"tp": w.tp, "pp": w.pp, "dp": w.dp, "ep": self.cfg.parallel.expert,
                "distributed_optimizer": self.cfg.optim.distributed}

    def save_checkpoint(self) -> Path:
        return self.checkpoints.save(Snapshot(self.step, self.model, self.optimizer, {"trainer": self.state_dict()},
                                              self.parts.signature, self.layout))

    def resume(self, path: Path) -> list[str]:
        """Restore everything from `path`; returns notes on what a new layout could not carry over."""
        restored = self.checkpoints.load(path, self.model, self.optimizer, self.parts.signature, self.layout)
        state = restored.state["trainer"]
        notes = [] if restored.saved_lr is None else [
            f"optim.lr is {self.cfg.optim.lr:g}, the checkpoint's run had {restored.saved_lr:g}: the new rate applies "
            f"from step {state['step'] + 1} on"]
        if restored.same_layout:
            self.load_state_dict(state)
            return notes
        # another layout: counters, data position and layout-free callback state carry over; the RNG is
        # re-derived and split-dependent state (power-iteration vectors of TP shards) starts afresh
        fresh = [name for name, c in self.callbacks.items() if not c.layout_free and state["callbacks"].get(name)]
        state = {**state, "optimizer": self.optimizer.state_dict(),
                 "callbacks": {k: v for k, v in state["callbacks"].items() if k not in fresh}}
        self.load_state_dict(state)
        derive_rng(self.cfg.seed, self.step)
        kept = "" if not fresh else f"; {', '.join(fresh)} restart their state"
        rule = "; the optimizer's update rule restarts its vectors" if self.optimizer.rule else ""
        return notes + [f"resharded {path} to tp={self.world.tp} pp={self.world.pp} dp={self.world.dp}: RNG "
                        f"re-derived from seed and step{kept}{rule}"]

    # ---- rewind: back to the last good checkpoint, past the data that caused the spikes ------------
    def rewind(self, trigger: dict) -> None:
        """Persistent spikes (`Recovery.observe`): reload the newest verified checkpoint from before the
        first spike, skip the data up to `rewind.margin` steps past the last one, and go on in this
        process. The plan is written to rewind.json first: a run killed mid-rewind finishes it on resume."""
        rewind = self.cfg.logging.monitors.spike.rewind
        if self.recovery.rewinds >= rewind.max_rewinds:
            raise TrainingStopped(
                f"stopped at step {self.step}: spikes persist ({trigger['reason']}, steps {trigger['spike_steps']}) "
                f"after {self.recovery.rewinds} rewinds, the limit logging.monitors.spike.rewind.max_rewinds; "
                "lower optim.lr or inspect the data near those steps")
        self.checkpoints.wait()
        target = self.checkpoints.newest_before(trigger["first_spike"])
        if target is None:
            raise TrainingStopped(
                f"stopped at step {self.step}: spikes persist from step {trigger['first_spike']} ({trigger['reason']}) "
                "and no verified checkpoint precedes it to rewind to; lower checkpoint.interval or raise keep_last")
        target_step = int(target.name.removeprefix("step_"))
        plan = self.recovery.plan(trigger, self.step, target, target_step, self.cfg.trainer.global_batch_size)
        if self.world.is_main:
            write_json(self.parts.run_dir / REWIND_FILE, plan)
        dist.barrier()
        self._apply_rewind(plan)

    def _apply_rewind(self, plan: dict) -> None:
        """Set aside the checkpoints after the target, load it, then the plan's data position and recovery
        state; the metrics logger drops the rows past it and logs the event (`on_rewind`)."""
        target_step = plan["target_step"]
        self.checkpoints.set_aside_after(target_step)
        self.resume(step_folder(self.checkpoints.root, target_step))
        self.loader.consumed += plan["rows"]
        self.recovery.load_state_dict(plan["recovery"])
        self.records.clear()
        self._flag, self._unlogged_skips, self.rewound = None, [], True
        event = plan["event"]
        print(f"keel: rewind {event['rewind']}: {event['reason']} at steps {event['spike_steps']}; back to step "
              f"{target_step}, {plan['rows']} data rows skipped", file=sys.stderr, flush=True)
        self._call("on_rewind", {"step": target_step, **event})

    def finish_pending_rewind(self) -> None:
        """A rewind whose plan (rewind.json) is newer than the state resumed: the run was killed in its
        middle, so finish it (a plan the checkpoint already holds is done)."""
        path = self.parts.run_dir / REWIND_FILE
        if not path.is_file():
            return
        plan = json.loads(path.read_text())
        if plan["recovery"]["rewinds"] > self.recovery.rewinds:
            self._apply_rewind(plan)
            self.rewound = False

    # ---- preemption: finish the step, checkpoint, exit with 128 + the signal --------------------------
    def _on_signal(self, signum, frame) -> None:
        """Note the first signal (the loop stops after the step and checkpoints). A later one, such as the
        SIGTERM a scheduler sends every process of the job, changes nothing: stopping now would lose the
        checkpoint, so it is ignored with one line (SIGKILL still stops at once)."""
        if os.getpid() != self._pid:
            return  # in a forked writer: the trainer decides when to stop, the writer finishes its file
        if self.signal_received is None:
            self.signal_received = signum
            return
        name = signal.Signals(signum).name
        # os.write: a handler may run while the main thread is inside a print
        os.write(2, f"keel: already stopping ({name} ignored): finishing the step and its checkpoint; "
                    "SIGKILL stops at once, losing them\n".encode())

    def _preempted(self, now: bool) -> int | None:
        """The signal any rank received, as all ranks agree on it: with more than one process, the flag
        reduced a step ago (read without waiting), or this step's where `now` (a logged step: a sync)."""
        if dist.get_world_size() == 1:
            return self.signal_received
        flag = torch.tensor([self.signal_received or 0], dtype=torch.int64)
        if self.world.device.type == "cuda":  # a plain copy to the GPU would wait for the work queued before it
            flag = flag.pin_memory().to(self.world.device, non_blocking=True)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        previous, self._flag = self._flag, StepRecords(("signal",))
        self._flag.put(self.step, flag)
        ready = self._flag if now else previous
        values = ready.take(self.step) if ready is not None else []
        return int(values[0][1]["signal"]) if values else None

    @contextlib.contextmanager
    def preemptible(self):
        """Catch the preemption signals while this is held. The caller holds it over training and the
        writing of the result: a second signal that lands after the checkpoint, while the result is being
        written, is then one ignored line instead of killing the process with the result half-written.
        After a preemption the handler stays: the process is on its way out with 128 + the signal, and a
        signal during its shutdown must not turn that exit into a death by signal."""
        previous = {s: signal.signal(s, self._on_signal) for s in self.PREEMPTION_SIGNALS}
        try:
            yield
        finally:
            if self.signal_received is None:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    def fit(self) -> None:
        """Train to `stop_at` (or `max_steps`); raises Preempted once a signal caught by `preemptible` has
        its checkpoint."""
        t = self.cfg.trainer
        stop = t.stop_at or t.max_steps
        try:
            self._call("on_train_start")
            if self.step == 0 and self.evaluates_at_start:
                self._call("on_start_eval", {"step": 0, **self.validate()})
            self.finish_pending_rewind()
            while self.step < stop:
                self.rewound = False
                metrics = self.train_step()
                if metrics is None:  # rewound to a checkpoint: go on from there
                    continue
                if self.step % t.eval_interval == 0 or self.step == t.max_steps:
                    metrics.update(self.validate())
                for c in self.callbacks.values():
                    c.on_step_end(self, metrics)
                    if "val_loss" in metrics:
                        c.on_eval(self, metrics)
                signum = self._preempted(now=self.logs(self.step))
                if signum or self.step % self.cfg.checkpoint.interval == 0 or self.step == stop:
                    self.account(self.step)  # every record is read before a checkpoint holds the counters
                    if self.rewound:
                        continue
                    path = self.save_checkpoint()
                    if signum:
                        self.checkpoints.wait()
                        raise Preempted(signum, self.step, path)
                else:
                    self.checkpoints.poll()  # publish a background save once every rank has written it
            self.checkpoints.wait()
        finally:
            self._end_callbacks()

    def _end_callbacks(self) -> None:
        """Every callback's `on_train_end`, however training ended. One that fails (a full disk under the
        loss plot, say) is one line on stderr and the others still run: it never masks why training
        stopped, and the run still writes its result."""
        for name, c in self.callbacks.items():
            try:
                c.on_train_end(self)
            except Exception as e:
                detail = str(e).strip().splitlines()
                print(f"keel: the {name} callback could not finish ({type(e).__name__}: "
                      f"{detail[0] if detail else 'no detail'}); its output is incomplete", file=sys.stderr, flush=True)

