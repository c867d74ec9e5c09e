"""Helpers shared by keel's tests: tiny run overrides, a launcher for keel processes, metrics readers,
and a bare tiny GPT. Fixtures live in conftest.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "pretrain" / "main.py"
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # a committed revision, for run_info.json and reports

def tiny_overrides(data: dict, run_dir: Path, steps: int = 6) -> list[str]:
    """A 2-layer model on the tiny corpus: a few seconds per run on 2 CPU cores."""
    return ["+experiment=smoke", f"run_dir={run_dir}", f"data.path={data['train']}", f"data.val_path={data['val']}",
            f"data.tokenizer={data['tokenizer']}", "data.seq_len=64", "model.hidden_size=64", "model.head_dim=16",
            f"trainer.max_steps={steps}", "trainer.eval_interval=3", "trainer.eval_batches=1",
            "checkpoint.interval=3", "trainer.log_interval=1", "trainer.progress=false", "logging.tensorboard=false",
            "logging.plot=false"]


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


def resume_folder(run_dir: Path, step: int, into: Path) -> Path:
    """A run folder holding only `run_dir`'s step-`step` checkpoint: keel started there resumes from that
    step, as the same run stopped there would, without the launch that stops it."""
    name = f"step_{step:08d}"
    shutil.copytree(Path(run_dir) / "checkpoints" / name, Path(into) / "checkpoints" / name)
    return Path(into)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}  # not the step-0 validation row


# the world's device: megatron's RoPE puts its frequencies on the GPU whenever CUDA exists, so a model
# left on the CPU there cannot run a forward; tests make their inputs here too
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TINY_GPT = ["model.num_layers=2", "model.hidden_size=64", "model.head_dim=16", "model.max_seq_len=64",
            "data.seq_len=32"]


def build_tiny_gpt(overrides: list[str] | None = None, vocab_size: int = 128, device: torch.device | str = "cpu"):
    """A bare keel GPT (no DDP) from the schema plus Hydra-style overrides, in eval mode, on `device`
    (pass DEVICE for a test that should run on a GPU too); needs the megatron_world fixture."""
    from models.builder import build_initialised_gpt
    from pretrain.config import compose_config

    cfg = compose_config(TINY_GPT + (overrides or []))
    gpt = build_initialised_gpt(cfg.model, cfg.attention, vocab_size, cfg.seed,
                                per_document_positions=cfg.data.reset_position_ids)
    return cfg, gpt.to(device).eval()


def assert_index_admitted(run_dir: Path) -> None:
    """Every checkpoint of a run: megatron's shard index (`.metadata`) reads through keel's allowlist
    (pretrain.checkpoint.safe_pickle) into exactly what an unrestricted pickle.load gives."""
    import pickle

    from pretrain.checkpoint.safe_pickle import read_metadata

    folders = sorted((Path(run_dir) / "checkpoints").glob("step_????????"))
    assert folders, f"no checkpoint in {run_dir}"
    for folder in folders:
        with open(folder / ".metadata", "rb") as f:
            assert read_metadata(folder / ".metadata") == pickle.load(f), folder
