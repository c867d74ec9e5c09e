"""Build every component from the config and run the trainer: what `pretrain/main.py` calls."""

from __future__ import annotations

import json
import random
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.config import ConfigError
from pretrain.rundir import git_revision, read_metrics, versions, write_json


def resolve_run_dir(cfg) -> Path:
    from hydra.core.hydra_config import HydraConfig

    if in_multirun():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.run_dir or f"runs/{cfg.name}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_signature(cfg, vocab_size: int) -> dict:
    """The model's shape, for a tokenizer of `vocab_size` tokens. Padded vocabulary rows, a final norm,
    QK-norm, QKV biases, a per-layer MoE placement (model.moe.layers) and a shared expert appear only when
    present, so checkpoints written before those options existed still match."""
    m, a = cfg.model, cfg.attention
    vocab, padded = m.vocab_rows(vocab_size)
    optional = {"padded_vocab_size": padded} if padded != vocab else {}
    optional |= {"final_norm": True} if m.final_norm else {}
    optional |= {"qk_norm": True} if a.qk_norm else {}
    optional |= {"qkv_bias": True} if a.qkv_bias else {}
    moe = m.moe
    if moe.num_experts and moe.layers is not None:
        optional["moe_layers"] = moe.moe_layers(m.num_layers)
    if moe.num_experts and moe.shared_expert_size is not None:
        optional["moe_shared_expert"] = [moe.shared_expert_size, moe.shared_expert_gate]
    return {"num_layers": m.num_layers, "hidden_size": m.hidden_size, "num_heads": m.heads,
            "head_dim": m.kv_channels, "ffn_hidden_size": m.ffn_size, "vocab_size": vocab,
            "attention": a.type, "num_query_groups": a.query_groups(m.heads), "activation": m.activation,
            "normalization": m.normalization, "position_embedding": m.position_embedding,
            "tie_embeddings": m.tie_embeddings, "moe_experts": m.moe.num_experts,
            "attention_shape": a.shape(m.kv_channels), **optional}


def run(raw) -> float | None:
    """Train as `raw` (Hydra's composed config) says. Bad input raises keel's own errors
    (`pretrain.errors.BAD_INPUT`), which the entry point prints as one line; anything else is a bug."""
    from pretrain.checkpoint.storage import STORAGE_ERRNOS, storage_problem
    from pretrain.config import command_line_overrides, to_config
    from pretrain.errors import BAD_INPUT

    cfg = to_config(raw, command_line_overrides())  # init_from brings its model unless the command line says
    try:
        return _run(cfg)
    except OSError as e:
        if isinstance(e, BAD_INPUT) or e.errno not in STORAGE_ERRNOS:
            raise
        # a full disk or a file-size limit outside a checkpoint save (metrics, plots): one line too
        raise ConfigError(storage_problem(e, Path(e.filename or resolve_run_dir(cfg)))) from e


def _run(cfg) -> float | None:
    from pretrain import distributed

    # 1. processes and parallel groups (the world size is validated here); the run folder takes files
    #    and is this run's alone
    world = distributed.init(cfg.parallel)
    try:
        run_dir = resolve_run_dir(cfg)
        check_writable(run_dir, world.rank)
        with hold_run_dir(run_dir, world) as note:
            return _train(cfg, world, run_dir, [note] if note else [])
    finally:
        distributed.shutdown()


@contextmanager
def hold_run_dir(run_dir: Path, world):
    """Rank 0 holds the run folder's lock (`RunLock`) for the whole run; when another run holds it, every
    rank stops with the same line. Yields a note when the lock was left by a run that died."""
    import torch.distributed as dist

    from pretrain.rundir import RunLock

    lock, outcome = RunLock(run_dir), [None, None]  # (why not, note)
    if world.is_main:
        try:
            outcome[1] = lock.acquire()
        except ConfigError as e:
            outcome[0] = str(e)
    if world.size > 1:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[0]:
        raise ConfigError(outcome[0])
    try:
        yield outcome[1]
    finally:
        lock.release()


@dataclass
class RunData:
    """The tokenizer and the packed training and validation sets of a run, validated."""

    tokenizer: object  # data.tokenizer.Tokenizer
    train_prefix: str | None  # None for a mixture (data.sources)
    val_prefix: str
    train: list  # data.loader.WeightedDataset: the training set, or each set of the mixture with its weight
    val: object  # data.format.PackedDataset: val_loss
    val_sets: dict = field(default_factory=dict)  # name -> PackedDataset: val_loss/NAME


def prepare_data(cfg, world) -> RunData:
    """Rank 0 builds what is missing (tokenizer, packed corpus), then every rank opens and checks it."""
    import torch.distributed as dist

    from data.prepare import ensure_packed, ensure_tokenizer, training_sources, validation_sets

    if world.is_main:
        ensure_packed(cfg.data, ensure_tokenizer(cfg.data))
    dist.barrier()
    tokenizer = ensure_tokenizer(cfg.data)
    train_prefix, val_prefix = ensure_packed(cfg.data, tokenizer)
    val, val_sets = validation_sets(cfg.data, tokenizer, val_prefix)
    return RunData(tokenizer, train_prefix, val_prefix, training_sources(cfg.data, tokenizer, train_prefix), val, val_sets)


def build_trainer(cfg, world, run_dir: Path, data: RunData | None = None, checkpoints=None):
    """Every component, validated and wired into a Trainer: data, model, optimizer, callbacks, and the
    run's `Checkpoints` (a new one for run_dir/checkpoints unless given)."""
    from megatron.core import parallel_state

    from data.loader import build_loader, validation_loader
    from models.builder import build_model
    from optim.optimizer import build_optimizer
    from pretrain.callbacks import RunContext, build_callbacks
    from pretrain.trainer import Components, Trainer

    if cfg.trainer.threads and world.device.type == "cpu":
        torch.set_num_threads(cfg.trainer.threads)
    data = data or prepare_data(cfg, world)
    seed_everything(cfg.seed)
    dtype = precision(cfg, world)
    built = build_model(cfg.model, cfg.attention, data.tokenizer.vocab_size, world.device, dtype, cfg.seed,
                        per_document_positions=cfg.data.reset_position_ids, distributed_optimizer=cfg.optim.distributed,
                        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
                        sequence_parallel=cfg.parallel.sequence_parallel(cfg.model))
    tp_group = parallel_state.get_tensor_model_parallel_group() if world.tp > 1 else None
    optimizer = build_optimizer(cfg.optim, cfg.model, built.ddp, built.gpt, dtype, tp_group)
    t = cfg.trainer
    loader = build_loader(data.train, t.global_batch_size, t.micro_batch_size, world.dp_rank, world.dp, cfg.seed)
    val_loader, *val_sets = [validation_loader(ds, t.global_batch_size, t.micro_batch_size, world.dp_rank, world.dp)
                             for ds in (data.val, *data.val_sets.values())]
    callbacks = build_callbacks(RunContext(cfg, world, run_dir, built.gpt, optimizer))
    return Trainer(cfg, Components(world=world, built=built, optimizer=optimizer, train=loader, val=val_loader,
                                   val_sets=dict(zip(data.val_sets, val_sets)), callbacks=callbacks, run_dir=run_dir,
                                   signature=model_signature(cfg, data.tokenizer.vocab_size),
                                   checkpoints=checkpoints or run_checkpoints(cfg, run_dir)))


def run_checkpoints(cfg, run_dir: Path):
    """The run's checkpoints folder, kept and written as `cfg.checkpoint` says."""
    from pretrain.checkpoint import Checkpoints

    return Checkpoints(run_dir / "checkpoints", cfg.checkpoint.keep_last, background=cfg.checkpoint.async_save)


@dataclass
class Start:
    """Where training starts: a checkpoint of this run_dir to resume, or weights to initialise from,
    and one line for each thing the user should know about that choice."""

    resume_from: Path | None = None
    init_from: Path | None = None
    notes: list[str] = field(default_factory=list)


def starting_point(cfg, checkpoints, signature: dict) -> Start:
    """Resuming the run's newest good checkpoint (in `checkpoints`) wins over init_from; either is
    verified and checked against the model before anything is built. Collective over all ranks."""
    from pretrain import checkpoint

    selected = checkpoints.select_resume()
    start = Start(notes=list(selected.notes))
    if selected.path is not None:
        checkpoint.check_compatible(checkpoint.read_meta(selected.path), signature, selected.path)
        start.resume_from = selected.path
        if cfg.init_from:
            start.notes.append(f"init_from={cfg.init_from} is ignored: {checkpoints.root.parent} already has "
                               "checkpoints, and a run resumes its own (use a new run_dir to start from init_from)")
    elif cfg.init_from:
        path = checkpoint.resolve(cfg.init_from)
        problem = checkpoint.verify(path)
        if problem:
            raise checkpoint.CheckpointError(f"init_from checkpoint {path} failed verification ({problem}); "
                                             "point init_from at a good checkpoint")
        checkpoints.mark_verified(path)
        checkpoint.check_compatible(checkpoint.read_meta(path), signature, path)
        start.init_from = path
    return start


def finished_result(cfg, run_dir: Path) -> dict | None:
    """The run folder's result.json when nothing is left to train: the run completed this config's last step
    (trainer.stop_at, else max_steps), or it diverged under this very config (resumed bit for bit, it would
    diverge again). A launch that finds one ends at once, as a launch that resumes the final checkpoint
    would, and also when the checkpoints are gone: a sweep relaunched where only its runs' records were
    kept (tools/experiments/run_records.py) trains only the runs those records lack."""
    try:
        result = json.loads((run_dir / "result.json").read_text())
        t = cfg.trainer
        if result["status"] == "completed":
            return result if result["step"] == (t.stop_at or t.max_steps) and result["max_steps"] == t.max_steps else None
        if result["status"] != "diverged":
            return None  # preempted or stopped: resume as usual
        recorded = json.loads((run_dir / "run_info.json").read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no record, or one being written or damaged: train (or resume) as usual
    return result if recorded == json.loads(json.dumps(asdict(cfg), default=str)) else None


def check_writable(run_dir: Path, rank: int) -> None:
    """The run folder and its checkpoints folder take a file, before anything is built."""
    from pretrain.checkpoint import CheckpointError, storage_problem

    for folder in (run_dir, run_dir / "checkpoints"):
        probe = folder / f".keel-write-test-{rank}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"keel")
            probe.unlink()
        except OSError as e:
            raise CheckpointError(storage_problem(e, folder)) from None


def validation_record(cfg, data: RunData) -> dict:
    """What each evaluation scores, per validation set: a digest of the token ids (the same for every
    seed and arm, see data.loader.VALIDATION_SEED), the rows and their tokens before padding, and the rows
    the set holds."""
    from data.loader import evaluation_batches, scored_digest, scored_tokens, validation_loader

    t = cfg.trainer
    record = {}
    for name, ds in {"val_loss": data.val, **{f"val_loss/{n}": d for n, d in data.val_sets.items()}}.items():
        loader = validation_loader(ds, t.global_batch_size, t.global_batch_size, 0, 1)  # the stream all ranks share
        batches = evaluation_batches(len(ds), t.global_batch_size, t.eval_batches)
        rows = batches * t.global_batch_size
        record[name] = {"digest": scored_digest(loader, batches), "rows": rows, "tokens": scored_tokens(loader, batches),
                        "set_rows": len(ds), "path": ds.prefix}
    return record


def write_run_info(run_dir: Path, info: dict) -> None:
    """`run_info.json` describes the latest start; earlier starts go to run_info_history.jsonl first."""
    current = run_dir / "run_info.json"
    if current.exists():
        with open(run_dir / "run_info_history.jsonl", "a") as f:
            f.write(json.dumps(json.loads(current.read_text())) + "\n")
    write_json(current, info, default=str)


def _train(cfg, world, run_dir: Path, notes: list[str]) -> float | None:
    from pretrain.trainer import Preempted, TrainingStopped

    # 1. a run that has finished ends here; else the data and the starting checkpoint are checked before
    #    the model exists
    finished = finished_result(cfg, run_dir)
    if finished is not None:
        _say(world, f"{run_dir} {finished['status']} at step {finished['step']} already (its result.json): nothing to "
                    "train (a new run_dir starts afresh)")
        final = finished.get("final_val_loss")
        return final if finished["status"] == "completed" and final is not None else float("nan")
    data = prepare_data(cfg, world)
    checkpoints = run_checkpoints(cfg, run_dir)
    start = starting_point(cfg, checkpoints, model_signature(cfg, data.tokenizer.vocab_size))
    start.notes[:0] = notes
    validation = validation_record(cfg, data)
    start.notes += [f"evaluation scores {v['rows']} rows of {v['path']}, which holds {v['set_rows']}: some rows count "
                    f"more than once (pack a larger validation set)" for v in validation.values() if v["rows"] > v["set_rows"]]
    if world.is_main:
        write_run_info(run_dir, {
            "config": asdict(cfg), "git_revision": git_revision(), "versions": versions(), "world_size": world.size,
            "tp": world.tp, "pp": world.pp, "dp": world.dp, "device": str(world.device),
            "dtype": str(precision(cfg, world)).removeprefix("torch."), "train_data": data.train_prefix,
            "val_data": data.val_prefix, "val_digest": validation["val_loss"]["digest"], "validation": validation,
            "tokenizer": data.tokenizer.describe(), "command": " ".join(sys.argv),
            "resumed_from": str(start.resume_from) if start.resume_from else None, "notes": start.notes})
    # 2. build, then resume exactly or start from pretrained weights (continual pretraining)
    trainer = build_trainer(cfg, world, run_dir, data, checkpoints)
    if start.resume_from is not None:
        start.notes += trainer.resume(start.resume_from)
        start.notes.append(f"resumed from {start.resume_from} at step {trainer.step}")
    elif start.init_from is not None:
        checkpoints.load(start.init_from, trainer.model, None, trainer.parts.signature)
        start.notes.append(f"initialised weights from {start.init_from}")
    for note in start.notes:
        _say(world, note)
    # 3. train; a run that diverges is recorded as such (a sweep goes on to its next run). Preemption
    #    signals are caught until the result is written
    with trainer.preemptible():
        status, exit_code = "completed", 0
        try:
            trainer.fit()
        except TrainingStopped as e:
            status, exit_code = "diverged", 1
            _say(world, f"keel: {e}")
        except Preempted as e:
            status, exit_code = "preempted", e.exit_code
            _say(world, f"keel: {e}")
        except Exception as e:  # bad data met mid-run, a save the disk refused, a bug: the result says so
            if world.is_main:
                write_result(run_dir, cfg, "failed", trainer.step, read_metrics(run_dir), start, error=str(e))
            raise
        rows = read_metrics(run_dir) if world.is_main else []
        val = [r["val_loss"] for r in rows if isinstance(r.get("val_loss"), float)]
        if world.is_main:
            write_result(run_dir, cfg, status, trainer.step, rows, start)
            if status != "preempted":
                _say(world, summary(run_dir, trainer, val, rows))
    if exit_code and not (status == "diverged" and in_multirun()):
        raise SystemExit(exit_code)
    return val[-1] if val and status == "completed" else float("nan")


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def write_result(run_dir: Path, cfg, status: str, step: int, rows: list[dict], start: Start | None = None,
                 error: str | None = None) -> None:
    """`result.json`: how the run ended and its final numbers (what sweep reports read). A run that
    `failed` records its error; on a full disk even this small file may not fit, and then it is skipped
    (the error line has said why)."""
    last = rows[-1] if rows else {}
    final_loss = last.get("loss") if isinstance(last.get("loss"), float) else None
    evals = [r for r in rows if "val_loss" in r]
    final_val = evals[-1]["val_loss"] if evals and isinstance(evals[-1]["val_loss"], float) else None
    if status != "failed" and (final_loss is None or (evals and final_val is None)):
        status = "diverged"  # ended on a non-finite loss
    result = {"status": status, "step": step, "max_steps": cfg.trainer.max_steps,
              "final_loss": final_loss, "final_val_loss": final_val, "initial_val_loss": initial_val_loss(rows),
              "hidden_size": cfg.model.hidden_size, "lr": cfg.optim.lr, "seed": cfg.seed, "name": cfg.name}
    if start is not None:
        result.update({"resumed_from": str(start.resume_from) if start.resume_from else None, "notes": start.notes})
    rewinds = [r for r in rows if r.get("event") == "rewind"]  # spike recovery (pretrain/recovery.py)
    if rewinds:
        result["rewinds"] = rewinds
    if error is not None:
        result["error"] = error.splitlines()[0]
    try:
        write_json(run_dir / "result.json", result)
    except OSError:
        if error is None:
            raise


def precision(cfg, world) -> torch.dtype:
    p = cfg.trainer.precision
    if p == "bf16" and world.device.type != "cuda":
        raise ConfigError("trainer.precision=bf16 needs a GPU; use fp32 (or auto) on CPU")
    return torch.bfloat16 if p == "bf16" or (p == "auto" and world.device.type == "cuda") else torch.float32


def initial_val_loss(rows: list[dict]) -> float | None:
    """The validation loss before the first step (trainer.eval_at_start), or None."""
    return next((r["val_loss"] for r in rows if r.get("step") == 0 and isinstance(r.get("val_loss"), float)), None)


def summary(run_dir: Path, trainer, val: list[float], rows: list[dict]) -> str:
    """How the run went: the validation loss, then each callback's lines (in call order), then where
    the run's files are."""
    from pretrain.checkpoint import latest

    entries = [("validation loss", f"{val[0]:.4f} -> {val[-1]:.4f}")] if val else []
    start = initial_val_loss(rows)
    if start is not None:
        entries.append(("before step 1", f"val_loss {start:.4f} (step 0)"))
    for callback in trainer.callbacks.values():
        entries += callback.summary(rows).items()
    entries += [("run folder", run_dir), ("checkpoint", latest(run_dir / "checkpoints"))]
    lines = [f"done: step {trainer.step}/{trainer.cfg.trainer.max_steps}"]
    return "\n".join(lines + [f"  {label:<16} {text}" for label, text in entries])


def _say(world, message: str) -> None:
    if world.is_main:
        print(message, flush=True)
