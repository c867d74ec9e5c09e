"""Helpers shared by keel's tests: tiny run overrides, a launcher for keel processes, metrics readers,
and a bare tiny GPT. Fixtures live in conftest.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "pretrain" / "main.py"


def tiny_overrides(data: dict, run_dir: Path, steps: int = 6) -> list[str]:
    """A 2-layer model on the tiny corpus: a few seconds per run on 2 CPU cores."""
    return ["+experiment=smoke", f"run_dir={run_dir}", f"data.path={data['train']}", f"data.val_path={data['val']}",
            f"data.tokenizer={data['tokenizer']}", "data.seq_len=64", "model.hidden_size=64", "model.head_dim=16",
            f"trainer.max_steps={steps}", "trainer.eval_interval=3", "trainer.eval_batches=1",
            "checkpoint.interval=3", "trainer.progress=false", "logging.tensorboard=false", "logging.plot=false"]


def child_env() -> dict[str, str]:
    """The environment of a keel subprocess: one thread, and no rendezvous variables inherited
    from a parent launcher (a child would try to join the parent's world)."""
    skip = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"}
    return {k: v for k, v in os.environ.items() if k not in skip} | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def run_keel(overrides: list[str], nproc: int = 1, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    env = child_env()
    if nproc == 1:
        cmd = [sys.executable, str(MAIN), *overrides]
    else:
        # --standalone binds its store to port 0: no window in which another test takes the port
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               str(MAIN), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"keel exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}")
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir)}


def build_tiny_gpt(overrides: list[str] | None = None, vocab_size: int = 128):
    """A bare keel GPT (no DDP) from the schema plus Hydra-style overrides."""
    from models.gpt import build_gpt, transformer_config
    from models.builder import layer_specs
    from models.init import reset_parameters
    from pretrain.config import compose_config

    base = ["model.num_layers=2", "model.hidden_size=64", "model.head_dim=16", "model.max_seq_len=64", "data.seq_len=32"]
    cfg = compose_config(base + (overrides or []))
    config = transformer_config(cfg.model, cfg.attention, cfg.num_query_groups())
    gpt = build_gpt(cfg.model, config, vocab_size, layer_specs(cfg), per_document_positions=cfg.data.reset_position_ids)
    reset_parameters(gpt, cfg.seed, cfg.model.init_std, cfg.model.num_layers, 0, cfg.model.tie_embeddings)
    return cfg, gpt.eval()
