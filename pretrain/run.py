"""Build every component from the config and run the trainer: what `pretrain/main.py` calls."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from pretrain.rundir import read_metrics, write_json


class ConfigError(ValueError):
    """A configuration or input problem, reported as one line before anything heavy starts."""


def resolve_run_dir(cfg) -> Path:
    from hydra.core.hydra_config import HydraConfig

    if in_multirun():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.run_dir or f"runs/{cfg.name}")


def git_revision() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_signature(cfg, vocab_size: int) -> dict:
    m, a = cfg.model, cfg.attention
    return {"num_layers": m.num_layers, "hidden_size": m.hidden_size, "num_heads": m.heads,
            "head_dim": m.kv_channels, "ffn_hidden_size": m.ffn_size, "vocab_size": vocab_size,
            "attention": a.type, "num_query_groups": a.query_groups(m.heads), "activation": m.activation,
            "normalization": m.normalization, "position_embedding": m.position_embedding,
            "tie_embeddings": m.tie_embeddings, "moe_experts": m.moe.num_experts,
            "attention_shape": a.shape(m.kv_channels)}


def run(raw) -> float | None:
    from pretrain.config import to_config

    try:
        cfg = to_config(raw)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        return _run(cfg)
    except (ValueError, FileNotFoundError) as e:
        if isinstance(e, ConfigError):
            raise
        if os.environ.get("KEEL_DEBUG"):
            raise
        raise ConfigError(str(e).splitlines()[0]) from e


def _run(cfg) -> float | None:
    from pretrain import distributed

    # 1. processes and parallel groups (the world size is validated here)
    world = distributed.init(cfg.parallel)
    try:
        return _train(cfg, world)
    finally:
        distributed.shutdown()


def build_trainer(cfg, world, run_dir: Path):
    """Every component, validated and wired into a Trainer: data, model, optimizer, callbacks."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from data.loader import PackedLoader
    from data.prepare import ensure_packed, ensure_tokenizer, open_checked
    from models.builder import build_model
    from optim.optimizer import build_optimizer
    from pretrain.callbacks import build_callbacks
    from pretrain.trainer import Components, Trainer

    if cfg.trainer.threads and world.device.type == "cpu":
        torch.set_num_threads(cfg.trainer.threads)
    # 1. data: rank 0 builds what is missing, everyone validates before the model is built
    if world.is_main:
        tokenizer = ensure_tokenizer(cfg.data)
        ensure_packed(cfg.data, tokenizer)
    dist.barrier()
    tokenizer = ensure_tokenizer(cfg.data)
    train_prefix, val_prefix = ensure_packed(cfg.data, tokenizer)
    train_set = open_checked(train_prefix, cfg.data, tokenizer, "training")
    val_set = open_checked(val_prefix, cfg.data, tokenizer, "validation")
    signature = model_signature(cfg, tokenizer.vocab_size)
    # 2. run folder: resolved config and git revision beside the outputs
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        info = {"config": asdict(cfg), "git_revision": git_revision(), "world_size": world.size,
                "tp": world.tp, "pp": world.pp, "dp": world.dp, "device": str(world.device),
                "train_data": train_prefix, "val_data": val_prefix, "tokenizer": tokenizer.describe(),
                "command": " ".join(sys.argv)}
        write_json(run_dir / "run_info.json", info, default=str)
    # 3. model, optimizer, loaders, callbacks
    seed_everything(cfg.seed)
    dtype = precision(cfg, world)
    model = build_model(cfg.model, cfg.attention, tokenizer.vocab_size, world.device, dtype, cfg.seed,
                        per_document_positions=cfg.data.reset_position_ids, distributed_optimizer=cfg.optim.distributed)
    tp_group = parallel_state.get_tensor_model_parallel_group() if world.tp > 1 else None
    optimizer = build_optimizer(cfg.optim, cfg.model, model.ddp, model.gpt, dtype, tp_group)
    t = cfg.trainer
    loader = PackedLoader(train_set, t.global_batch_size, t.micro_batch_size, world.dp_rank, world.dp, cfg.seed)
    val_loader = PackedLoader(val_set, t.global_batch_size, t.micro_batch_size, world.dp_rank, world.dp, cfg.seed + 1)
    callbacks = build_callbacks(cfg, world, run_dir, model.gpt, optimizer)
    return Trainer(cfg, Components(world=world, model=model, optimizer=optimizer, train=loader, val=val_loader,
                                   callbacks=callbacks, run_dir=run_dir, signature=signature))


def starting_point(cfg, run_dir: Path, signature: dict) -> tuple[Path | None, Path | None]:
    """(checkpoint to resume, checkpoint to initialise weights from): resuming this run_dir wins over
    init_from; either must match the model."""
    from pretrain import checkpoint

    resume_from = checkpoint.latest(run_dir / "checkpoints")
    init_from = checkpoint.resolve(cfg.init_from) if cfg.init_from and resume_from is None else None
    for path in filter(None, (resume_from, init_from)):
        checkpoint.check_compatible(json.loads((path / "meta.json").read_text()), signature, path)
    return resume_from, init_from


def _train(cfg, world) -> float | None:
    from pretrain import checkpoint
    from pretrain.trainer import TrainingStopped

    run_dir = resolve_run_dir(cfg)
    trainer = build_trainer(cfg, world, run_dir)
    # 4. resume exactly, or start from pretrained weights (continual pretraining)
    resume_from, init_from = starting_point(cfg, run_dir, trainer.parts.signature)
    if resume_from is not None:
        trainer.resume(resume_from)
        _say(world, f"resumed from {resume_from} at step {trainer.step}")
    elif init_from is not None:
        checkpoint.load(init_from, trainer.gpt, None, trainer.parts.signature)
        _say(world, f"initialised weights from {init_from}")
    # 5. train; a run that diverges is recorded as such (a sweep goes on to its next run)
    status = "completed"
    try:
        trainer.fit()
    except TrainingStopped as e:
        status = "diverged"
        _say(world, f"keel: {e}")
    rows = read_metrics(run_dir) if world.is_main else []
    val = [r["val_loss"] for r in rows if isinstance(r.get("val_loss"), float)]
    if world.is_main:
        write_result(run_dir, cfg, status, trainer.step, rows)
        _say(world, summary(run_dir, trainer, val))
    if status == "diverged" and not in_multirun():
        raise SystemExit(1)
    return val[-1] if val and status == "completed" else float("nan")


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def write_result(run_dir: Path, cfg, status: str, step: int, rows: list[dict]) -> None:
    """`result.json`: how the run ended and its final numbers (what sweep reports read)."""
    last = rows[-1] if rows else {}
    final_loss = last.get("loss") if isinstance(last.get("loss"), float) else None
    evals = [r for r in rows if "val_loss" in r]
    final_val = evals[-1]["val_loss"] if evals and isinstance(evals[-1]["val_loss"], float) else None
    if final_loss is None or (evals and final_val is None):
        status = "diverged"  # ended on a non-finite loss
    result = {"status": status, "step": step, "max_steps": cfg.trainer.max_steps,
              "final_loss": final_loss, "final_val_loss": final_val,
              "hidden_size": cfg.model.hidden_size, "lr": cfg.optim.lr, "seed": cfg.seed, "name": cfg.name}
    write_json(run_dir / "result.json", result)


def precision(cfg, world) -> torch.dtype:
    p = cfg.trainer.precision
    if p == "bf16" and world.device.type != "cuda":
        raise ConfigError("trainer.precision=bf16 needs a GPU; use fp32 (or auto) on CPU")
    return torch.bfloat16 if p == "bf16" or (p == "auto" and world.device.type == "cuda") else torch.float32


def summary(run_dir: Path, trainer, val: list[float]) -> str:
    from pretrain.checkpoint import latest

    lines = [f"done: step {trainer.step}/{trainer.cfg.trainer.max_steps}"]
    if val:
        lines.append(f"  validation loss  {val[0]:.4f} -> {val[-1]:.4f}")
    lines += [f"  run folder       {run_dir}", f"  metrics          {run_dir / 'metrics.jsonl'}",
              f"  loss plot        {run_dir / 'loss.png'}", f"  tensorboard      {run_dir / 'tensorboard'}",
              f"  checkpoint       {latest(run_dir / 'checkpoints')}"]
    return "\n".join(lines)


def _say(world, message: str) -> None:
    if world.is_main:
        print(message, flush=True)
