"""An imported keel checkpoint at TP=2, PP=2 and DP=2, in one 2-process torchrun world
(tests/tools/test_hf_import_export.py launches it): its logits at TP=2 and PP=2, the log-likelihoods keel's
lm-eval adapter gives the tiny multiple-choice task's requests there (tests/lm_eval_helpers.py), and what
`tools/evaluate.py --tasks` prints at each layout:

    torchrun --standalone --nproc-per-node 2 tests/tools/hf_parallel_worker.py CKPT TOKENS.pt TASKS_DIR OUT.pt

Rank 0 writes {"tp2": logits, "pp2": logits, "tp2_loglikelihoods": [(logprob, greedy), ...], "pp2_...": ...,
"LAYOUT_cli": [(exit code, stdout, stderr) of each rank], "pp2_generation": the same for a generation task},
the logits [b, s, padded vocabulary].
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


def main() -> None:
    from megatron.core import parallel_state as ps

    from pretrain import distributed
    from pretrain.config import ParallelConfig

    ckpt, tokens_file, tasks_dir, out_file = sys.argv[1:]
    tokens = torch.load(tokens_file)
    task = {kind: f"{tasks_dir}/keel_{kind}.yaml" for kind in ("mc", "gen", "rolling")}
    results = {}
    layouts = (("tp2", {"tensor": 2}, ["--tp", "2"], "mc gen rolling"),
               ("pp2", {"pipeline": 2}, ["--pp", "2"], "mc rolling"),
               ("dp2", {}, [], "mc gen rolling"))
    for name, layout, flags, kinds in layouts:
        distributed.init(ParallelConfig(backend="gloo", **layout))  # the process group stays, the layout changes
        if layout:  # 1. the logits, and the adapter's log-likelihoods on every rank of the replica
            logits = layout_logits(ckpt, tokens)
            if logits is not None:
                results[name] = logits
            scores = adapter_loglikelihoods(ckpt)
            if dist.get_rank() == 0:
                results[f"{name}_loglikelihoods"] = scores
        # 2. tools/evaluate.py --tasks at this layout
        cli = ["--checkpoint", ckpt, "--json", "--bootstrap-iters", "0", *flags, "--tasks"]
        results[f"{name}_cli"] = evaluate_cli(*cli, ",".join(task[k] for k in kinds.split()))
        if name == "pp2":
            results["pp2_generation"] = evaluate_cli(*cli, task["gen"])
        ps.destroy_model_parallel()
    # the last pipeline stage holds the PP logits: gather everything on rank 0
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        torch.save({k: v for part in gathered for k, v in part.items()}, out_file)
    distributed.shutdown()


if __name__ == "__main__":  # megatron's checkpoint reader starts worker processes
    main()
