"""Imported keel checkpoints at several parallel layouts, in one 2-process torchrun world
(tests/tools/test_hf_import_export.py launches it once for every family):

    torchrun --standalone --nproc-per-node 2 tests/tools/hf_parallel_worker.py TOKENS.pt TASKS_DIR OUT.pt \
        LAYOUT:NAME=CKPT [LAYOUT:NAME=CKPT ...]

LAYOUT is tp2, pp2, ep2 (expert parallelism over the two ranks, each seeing the same tokens) or dp2. At
tp2, pp2 and ep2 rank 0 writes each checkpoint's logits under "LAYOUT:NAME" ([b, s, padded vocabulary]),
and under "sequence_parallel/LAYOUT/NAME" whether the model ran sequence parallel (an MoE at tp2 does;
its logits without, as decoding builds it, under "without_sequence_parallel/LAYOUT/NAME").
The checkpoint named `llama` is also scored by keel's lm-eval adapter and by `tools/evaluate.py --tasks`
over the tiny tasks in TASKS_DIR (tests/lm_eval_helpers.py): "LAYOUT_loglikelihoods" (tp2, pp2: the
adapter's [(logprob, greedy), ...] for the multiple-choice requests), "LAYOUT_cli" ([(exit code, stdout,
stderr)] of each rank; at pp2 log-likelihood tasks only) and "pp2_generation" (a generation task at PP=2).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist


def layout_logits(ckpt: str, tokens: torch.Tensor, sequence_parallel: bool | None = None
                  ) -> tuple[torch.Tensor | None, bool]:
    """The full logits, padded rows included, on the last stage's TP rank 0 (None elsewhere), and whether
    the model split its sequences over the TP ranks (sequence parallelism: an MoE's default at TP>1)."""
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
    gpt = build_initialised_gpt(cfg.model, cfg.attention, vocab, cfg.seed, sequence_parallel=sequence_parallel).eval()
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
            return None, gpt.config.sequence_parallel
    # 2. the vocabulary-parallel shards gathered (each rank masked the padded rows of its own shard)
    logits = gather_from_tensor_model_parallel_region(out)
    return (logits if ps.get_tensor_model_parallel_rank() == 0 else None), gpt.config.sequence_parallel


def adapter_loglikelihoods(ckpt: str) -> list[tuple[float, bool]]:
    """keel's lm-eval adapter (pretrain/downstream.py) at this world's TP layout, on every TP rank."""
    from pretrain.downstream import KeelLM
    from tests.lm_eval_helpers import choice_requests
    from tools.generate import load_model

    loaded = load_model(ckpt)
    return KeelLM(loaded.gpt, loaded.tokenizer, loaded.cfg.model.max_seq_len, batch_size=4).loglikelihood(
        choice_requests())


def evaluate_cli(*args: str) -> list[tuple[int, str, str]]:
    """Each rank's exit code, stdout and stderr of tools/evaluate.py in this world."""
    import contextlib
    import io

    from tools.evaluate import main as evaluate

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = evaluate(list(args))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (code, out.getvalue(), err.getvalue()))
    return gathered


LAYOUTS = {"tp2": {"tensor": 2}, "pp2": {"pipeline": 2}, "ep2": {"expert": 2}, "dp2": {}}
CLI_FLAGS = {"tp2": ["--tp", "2"], "pp2": ["--pp", "2"], "dp2": []}
CLI_TASKS = {"tp2": ("mc", "gen", "rolling"), "pp2": ("mc", "rolling"), "dp2": ("mc", "gen", "rolling")}


def lm_eval_checks(layout: str, ckpt: str, tasks_dir: str) -> dict:
    """The adapter's log-likelihoods and evaluate.py's printed scores at this layout."""
    results = {}
    if layout != "dp2":  # at DP=2 each rank is a replica: the adapter's scores are one process's
        scores = adapter_loglikelihoods(ckpt)
        if dist.get_rank() == 0:
            results[f"{layout}_loglikelihoods"] = scores
    task = {kind: f"{tasks_dir}/keel_{kind}.yaml" for kind in ("mc", "gen", "rolling")}
    cli = ["--checkpoint", ckpt, "--json", "--bootstrap-iters", "0", *CLI_FLAGS[layout], "--tasks"]
    results[f"{layout}_cli"] = evaluate_cli(*cli, ",".join(task[k] for k in CLI_TASKS[layout]))
    if layout == "pp2":
        results["pp2_generation"] = evaluate_cli(*cli, task["gen"])
    return results


def main() -> None:
    from megatron.core import parallel_state as ps

    from pretrain import distributed
    from pretrain.config import ParallelConfig

    tokens_file, tasks_dir, out_file, *jobs = sys.argv[1:]
    tokens = torch.load(tokens_file)
    by_layout: dict[str, list[tuple[str, str]]] = {}
    for job in jobs:
        layout, rest = job.split(":", 1)
        by_layout.setdefault(layout, []).append(tuple(rest.split("=", 1)))
    results = {}
    for layout, checkpoints in by_layout.items():
        distributed.init(ParallelConfig(backend="gloo", **LAYOUTS[layout]))  # the process group stays
        for name, ckpt in checkpoints:
            if layout != "dp2":
                logits, sequence_parallel = layout_logits(ckpt, tokens)
                if logits is not None and (layout != "ep2" or dist.get_rank() == 0):
                    results[f"{layout}:{name}"] = logits
                    results[f"sequence_parallel/{layout}/{name}"] = sequence_parallel
                if sequence_parallel:  # also as decoding and tools/evaluate.py build it, without
                    plain, _ = layout_logits(ckpt, tokens, sequence_parallel=False)
                    if plain is not None:
                        results[f"without_sequence_parallel/{layout}/{name}"] = plain
            if name == "llama" and layout in CLI_FLAGS:
                results |= lm_eval_checks(layout, ckpt, tasks_dir)
        ps.destroy_model_parallel()
    # the last pipeline stage holds the PP logits: gather everything on rank 0
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        torch.save({k: v for part in gathered for k, v in part.items()}, out_file)
    distributed.shutdown()


if __name__ == "__main__":  # megatron's checkpoint reader starts worker processes
    main()
