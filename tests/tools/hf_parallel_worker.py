"""Logits of imported keel checkpoints at several parallel layouts, in one 2-process torchrun world
(tests/tools/test_hf_import_export.py launches it once for every family):

    torchrun --standalone --nproc-per-node 2 tests/tools/hf_parallel_worker.py TOKENS.pt OUT.pt \
        LAYOUT:NAME=CKPT [LAYOUT:NAME=CKPT ...]

LAYOUT is tp2, pp2 or ep2 (expert parallelism over the two ranks, each seeing the same tokens). Rank 0
writes {"LAYOUT:NAME": logits}, each [b, s, padded vocabulary].
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist


def layout_logits(ckpt: str, tokens: torch.Tensor) -> torch.Tensor | None:
    """The full logits, padded rows included, on the last stage's TP rank 0 (None elsewhere)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from data.tokenizer import load_tokenizer
    from models.builder import build_initialised_gpt
    from pretrain import checkpoint
    from pretrain.run import model_signature
    from tools.generate import run_folder, saved_config

    step_dir = checkpoint.resolve(ckpt)
    cfg, info = saved_config(run_folder(step_dir))
    vocab = load_tokenizer(info["tokenizer"]["path"]).vocab_size
    gpt = build_initialised_gpt(cfg.model, cfg.attention, vocab, cfg.seed).eval()
    checkpoint.load(step_dir, gpt, None, model_signature(cfg, vocab))
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        # 1. the first stage's hidden states go to the second stage, as megatron's schedules pass them
        if not ps.is_pipeline_first_stage():
            hidden = torch.empty(tokens.shape[1], tokens.shape[0], cfg.model.hidden_size)
            dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
            gpt.set_input_tensor(hidden)
        out = gpt(tokens, positions, None)
        if not ps.is_pipeline_last_stage():
            dist.send(out, dst=ps.get_pipeline_model_parallel_next_rank())
            return None
    # 2. the vocabulary-parallel shards gathered (each rank masked the padded rows of its own shard)
    logits = gather_from_tensor_model_parallel_region(out)
    return logits if ps.get_tensor_model_parallel_rank() == 0 else None


LAYOUTS = {"tp2": {"tensor": 2}, "pp2": {"pipeline": 2}, "ep2": {"expert": 2}}


def main() -> None:
    from megatron.core import parallel_state as ps

    from pretrain import distributed
    from pretrain.config import ParallelConfig

    tokens_file, out_file, *jobs = sys.argv[1:]
    tokens = torch.load(tokens_file)
    by_layout: dict[str, list[tuple[str, str]]] = {}
    for job in jobs:
        layout, rest = job.split(":", 1)
        by_layout.setdefault(layout, []).append(tuple(rest.split("=", 1)))
    results = {}
    for layout, checkpoints in by_layout.items():
        distributed.init(ParallelConfig(backend="gloo", **LAYOUTS[layout]))  # the process group stays
        for name, ckpt in checkpoints:
            logits = layout_logits(ckpt, tokens)
            if logits is not None and (layout != "ep2" or dist.get_rank() == 0):
                results[f"{layout}:{name}"] = logits
        ps.destroy_model_parallel()
    # the last pipeline stage holds the PP logits: gather everything on rank 0
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        torch.save({k: v for part in gathered for k, v in part.items()}, out_file)
    distributed.shutdown()


if __name__ == "__main__":  # megatron's checkpoint reader starts worker processes
    main()
