"""Held-out loss of a keel checkpoint or a Hugging Face model folder on a corpus, or a keel checkpoint's
scores on downstream tasks with lm-evaluation-harness.

    python tools/evaluate.py --checkpoint (RUN_OR_CKPT | HF_DIR) --input CORPUS... [--tokenizer T] [--json]
    [torchrun --nproc-per-node N] tools/evaluate.py --checkpoint RUN_OR_CKPT --tasks hellaswag,my_task.yaml \
        [--tp T] [--pp P] [--limit N] [--json]

Reports the mean loss per predicted token (nats), bits per byte (the summed loss in bits over the
corpus' UTF-8 bytes, which compares models with different tokenizers fairly), and the tokens and
bytes evaluated; `--json` prints one object with the keys loss, bits_per_byte, tokens, bytes.

Each document is encoded as the tokenizer does for training (keel's sentencepiece models: the text
then EOD; Hugging Face tokenizers: their template, e.g. BOS first, then EOD) and cut into windows of
--seq-len tokens that overlap by one, so every token after the document's first is predicted exactly
once, from its own document only. CORPUS is files, globs or stdlib[:SUBSET[:SPLIT]] (as
tools/pack.py --input). A keel checkpoint is run as keel runs it (one process); a Hugging Face
folder through transformers (local files only, no remote code, safetensors unless --allow-pickle).

With --tasks (lm-eval task names, or paths of task YAML files), lm-eval scores the checkpoint directly
through keel's adapter (pretrain/downstream.py: log-likelihoods from keel's forward, generation from its
KV-cache decoding; the `eval` extra installs lm-eval) and prints lm-eval's table, or with --json its
results. Under torchrun it runs at keel's own layout: --tp for every task, --pp for log-likelihood tasks
(a generation task at --pp > 1 is refused in one line: keel has no pipeline-parallel decoding), and
the data-parallel ranks (N / (T * P)) share the requests; the first rank prints. A Hugging Face folder
is lm-eval's own: `lm_eval --model hf --model_args pretrained=HF_DIR`.
Exit codes: 0 done, 2 a bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from data.errors import DataError, TokenizerError
from pretrain import cpu_compat  # noqa: F401  (silences megatron's import warnings)
from tools.hf_folder import FolderError

DEFAULT_SEQ_LEN = 1024


@dataclass
class Model:
    logits: Callable[[torch.Tensor], torch.Tensor]  # tokens [b, s] -> logits [b, s, vocab] over real tokens
    vocab: int  # tokens it predicts
    max_positions: int
    tokenizer: object  # data.tokenizer.Tokenizer: the checkpoint's own


def windows(ids: list[int], seq_len: int) -> list[list[int]]:
    """Windows of at most seq_len tokens, each starting on the previous one's last token."""
    return [ids[i:i + seq_len] for i in range(0, len(ids) - 1, seq_len - 1)]


@torch.no_grad()
def score(model: Model, tokenizer, texts: Iterable[str], seq_len: int, batch_size: int = 8) -> dict:
    """Summed loss, predicted tokens and bytes over every document; then the means."""
    nll, tokens, nbytes, pending = 0.0, 0, 0, []

    def flush() -> tuple[float, int]:
        width = max(map(len, pending))
        batch = torch.tensor([w + [tokenizer.pad] * (width - len(w)) for w in pending])
        mask = torch.tensor([[1.0] * (len(w) - 1) + [0.0] * (width - len(w)) for w in pending])
        logits = model.logits(batch)[:, :-1].float()
        token_nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
        pending.clear()
        return float((token_nll.double() * mask.flatten()).sum()), int(mask.sum())

    # 1. each document as training encodes it, cut into overlapping windows
    for text in texts:
        ids = tokenizer.encode(text)
        if not ids:
            continue
        nbytes += len(text.encode("utf-8"))
        for w in windows(ids + [tokenizer.eod], seq_len):
            pending.append(w)
            if len(pending) == batch_size:
                loss, n = flush()
                nll, tokens = nll + loss, tokens + n
    if pending:
        loss, n = flush()
        nll, tokens = nll + loss, tokens + n
    # 2. per token (nats) and per byte (bits)
    if not tokens:
        raise DataError("the input holds no text to evaluate; check --input")
    return {"loss": nll / tokens, "bits_per_byte": nll / math.log(2) / nbytes, "tokens": tokens, "bytes": nbytes}


def keel_model(checkpoint: str) -> Model:
    """A keel run or checkpoint, at one process (needs a megatron world of one)."""
    from tools.generate import load_model

    loaded = load_model(checkpoint)
    gpt = loaded.gpt

    def logits(tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        return gpt(tokens, positions, None)[..., :gpt.unpadded_vocab_size]

    return Model(logits, gpt.unpadded_vocab_size, loaded.cfg.model.max_seq_len, loaded.tokenizer)


def hf_model(folder: Path, allow_pickle: bool) -> Model:
    """A Hugging Face model folder through transformers, in fp32."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from data.tokenizer import load_tokenizer
    from tools.hf_folder import Weights, check_folder

    Weights(check_folder(folder), allow_pickle)  # no weights, or pickles not allowed: one line before loading
    hf_logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True,
                                                 trust_remote_code=False, use_safetensors=not allow_pickle).eval()
    config = model.config
    tokenizer = load_tokenizer(folder) if (folder / "tokenizer.json").exists() else None
    return Model(lambda tokens: model(tokens).logits, config.vocab_size, config.max_position_embeddings, tokenizer)


def load(checkpoint: str, allow_pickle: bool) -> Model:
    """A keel checkpoint when a run_info.json lies at or above the path, else a Hugging Face folder."""
    from pretrain.rundir import find_run_folder

    path = Path(checkpoint)
    if find_run_folder(path) is not None:
        return keel_model(checkpoint)
    if (path / "config.json").exists():
        return hf_model(path, allow_pickle)
    raise FolderError(f"{path} is neither a keel run or checkpoint (no run_info.json) nor a Hugging Face model "
                      "folder (no config.json); check --checkpoint")


def evaluate(checkpoint: str, inputs: list[str], tokenizer: str | None = None, seq_len: int | None = None,
             batch_size: int = 8, allow_pickle: bool = False, text_field: str = "text") -> dict:
    """The scores of a checkpoint on a corpus; a keel checkpoint needs a megatron world of one."""
    from data.sources import DocumentSource
    from data.tokenizer import load_tokenizer
    from models.config import check_vocabulary

    source = DocumentSource(inputs, text_field=text_field)  # inputs checked before the model loads
    model = load(checkpoint, allow_pickle)
    tok = load_tokenizer(tokenizer) if tokenizer else model.tokenizer
    if tok is None:
        raise TokenizerError(f"{checkpoint} holds no tokenizer.json; pass --tokenizer")
    check_vocabulary(tok.vocab_size, model.vocab, f"tokenizer {tok.path}", checkpoint)
    seq_len = seq_len or min(model.max_positions, DEFAULT_SEQ_LEN)
    return score(model, tok, (d.text for d in source), seq_len, batch_size)


def evaluate_tasks(checkpoint: str, tasks: list[str], limit: float | None = None, num_fewshot: int | None = None,
                   batch_size: int = 8, max_gen_toks: int = 256, bootstrap_iters: int = 100000) -> dict:
    """lm-eval's results for a keel checkpoint on `tasks`, at this megatron world's layout (the data-parallel
    ranks share the requests); on the first rank (None on the others)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from pretrain.downstream import KeelLM, run_tasks, task_manager
    from pretrain.rundir import find_run_folder
    from tools.generate import load_model

    if find_run_folder(Path(checkpoint)) is None:
        raise FolderError(f"{checkpoint} is not a keel run or checkpoint (no run_info.json); --tasks scores keel "
                          "checkpoints (a Hugging Face folder: lm_eval --model hf --model_args pretrained=DIR)")
    manager = task_manager(tasks)  # task files checked before the model loads
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    loaded = load_model(checkpoint, device)
    group = parallel_state.get_data_parallel_group() if parallel_state.get_data_parallel_world_size() > 1 else None
    lm = KeelLM(loaded.gpt, loaded.tokenizer, loaded.cfg.model.max_seq_len, batch_size, max_gen_toks, group=group)
    return run_tasks(lm, tasks, limit, num_fewshot, bootstrap_iters, manager).results


REPORTED = ("results", "groups", "n-shot", "n-samples", "versions", "higher_is_better")  # --json: lm-eval's keys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="keel run folder or checkpoint, or a Hugging Face model folder")
    p.add_argument("--input", nargs="+", metavar="PATH", help="files, globs or stdlib[:SUBSET[:SPLIT]]")
    p.add_argument("--tasks", help="comma-separated lm-eval task names or task YAML paths (instead of --input)")
    p.add_argument("--limit", type=float, help="--tasks: examples per task (a fraction when below 1)")
    p.add_argument("--num-fewshot", type=int, help="--tasks: few-shot examples; default: each task's own")
    p.add_argument("--max-gen-toks", type=int, default=256, help="--tasks: new tokens when a task names none")
    p.add_argument("--tp", type=int, default=1, help="--tasks: tensor-parallel size (under torchrun)")
    p.add_argument("--pp", type=int, default=1, help="--tasks: pipeline-parallel size, log-likelihood tasks only")
    p.add_argument("--bootstrap-iters", type=int, default=100000, help="--tasks: lm-eval's bootstrap for stderrs")
    p.add_argument("--tokenizer", help="default: the checkpoint's own")
    p.add_argument("--seq-len", type=int, help=f"window length; default: min(model's maximum, {DEFAULT_SEQ_LEN})")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--text-field", default="text", help="field holding the text in JSON/Parquet/Arrow")
    p.add_argument("--allow-pickle", action="store_true", help="a Hugging Face folder's pickled weights too")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.seq_len is not None and args.seq_len < 2:
        p.error("--seq-len must be at least 2")
    if min(args.tp, args.pp) < 1:
        p.error("--tp and --pp must be at least 1")
    if bool(args.input) == bool(args.tasks):
        p.error("pass either --input (held-out loss) or --tasks (lm-eval), not both")
    if args.tasks:
        return _report_tasks(args)
    if (args.tp, args.pp) != (1, 1):
        p.error("--tp and --pp apply to --tasks; the held-out loss runs one process")

    from tools.hf_folder import in_tool_world

    code, result = in_tool_world("evaluate.py", lambda: evaluate(
        args.checkpoint, args.input, args.tokenizer, args.seq_len, args.batch_size, args.allow_pickle, args.text_field))
    if code:
        return code
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.checkpoint}: loss {result['loss']:.4f} nats/token, {result['bits_per_byte']:.4f} bits/byte "
              f"over {result['tokens']:,} tokens and {result['bytes']:,} bytes")
    return 0


def _report_tasks(args) -> int:
    from pretrain.config import ParallelConfig
    from tools.hf_folder import in_tool_world

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    code, results = in_tool_world("evaluate.py", lambda: evaluate_tasks(
        args.checkpoint, tasks, limit, args.num_fewshot, args.batch_size, args.max_gen_toks, args.bootstrap_iters),
        ParallelConfig(tensor=args.tp, pipeline=args.pp))
    if code or results is None or int(os.environ.get("RANK", "0")):  # lm-eval's results: on the first rank
        return code
    from lm_eval.utils import handle_non_serializable, make_table

    if args.json:
        print(json.dumps({k: results[k] for k in REPORTED if k in results}, default=handle_non_serializable))
    else:
        print(make_table(results))
        if results.get("groups"):
            print(make_table(results, "groups"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
