"""Generate text from a trained keel checkpoint with the KV cache (models/inference).

    python tools/generate.py --checkpoint RUN_DIR_OR_STEP_DIR --prompt "def main(" [--prompt "import" ...] \
        --max-new-tokens 64 [--temperature 0.8 --top-k 50 --seed 0] [--device cuda] [--dtype bf16] [--eager]

Greedy when --temperature is 0 (the default). Several --prompt flags decode as one batch: the prompts
are right-padded and each sequence keeps its own length, so each continues as if alone. On CUDA the
one-token step is replayed from a CUDA graph and attends with the split-K Triton kernel (--eager:
launched op by op). The model and tokenizer come from the run folder's
run_info.json; the weights from the dist_checkpointing folder, loaded in a world of one.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from data.errors import DataError
from pretrain import cpu_compat  # noqa: F401  (silences megatron's import warnings)
from pretrain.checkpoint.errors import CheckpointError


def run_folder(step_dir: Path) -> Path:
    """checkpoints/step_N lives two levels below the run folder that holds run_info.json."""
    from pretrain.rundir import find_run_folder

    found = find_run_folder(step_dir)
    if found is None:
        raise CheckpointError(f"no run_info.json above {step_dir}; point --checkpoint at a keel run folder")
    return found


def saved_config(run_dir: Path):
    """The run's resolved KeelConfig, rebuilt from run_info.json (validated again on the way)."""
    from pretrain.config import config_from_dict
    from pretrain.rundir import read_run_info

    info = read_run_info(run_dir)
    return config_from_dict(info["config"]), info


@dataclass
class Loaded:
    gpt: torch.nn.Module  # the bare GPT in eval mode
    tokenizer: object  # data.tokenizer.Tokenizer
    step_dir: Path  # the checkpoint it came from
    cfg: object  # the run's KeelConfig


def load_model(checkpoint: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Loaded:
    """The model of a run or step folder with its tokenizer and config; needs an initialised world."""
    from data.tokenizer import load_tokenizer
    from models.inference import build_for_decode
    from pretrain import checkpoint as ckpt
    from pretrain.run import model_signature

    step_dir = ckpt.resolve(checkpoint)
    cfg, info = saved_config(run_folder(step_dir))
    tokenizer = load_tokenizer(info["tokenizer"]["path"])
    gpt = build_for_decode(cfg.model, cfg.attention, tokenizer.vocab_size, cfg.seed)
    ckpt.load(step_dir, gpt, None, model_signature(cfg, tokenizer.vocab_size))
    return Loaded(gpt.to(device=device, dtype=dtype).eval(), tokenizer, step_dir, cfg)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a run folder, its checkpoints folder or a step_N folder")
    p.add_argument("--prompt", required=True, action="append", help="repeat for a batch of prompts")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--eager", action="store_true", help="on CUDA: no CUDA graph for the one-token step")
    args = p.parse_args(argv)

    from tools.hf_folder import in_tool_world

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    code, _ = in_tool_world("generate.py", lambda: _generate(args, dtype))  # a bad checkpoint: one line, exit 2
    return code


def _generate(args, dtype: torch.dtype) -> None:
    from models.inference import generate, right_pad

    loaded = load_model(args.checkpoint, args.device, dtype)
    gpt, tok, step_dir = loaded.gpt, loaded.tokenizer, loaded.step_dir
    ids = [tok.encode(text) for text in args.prompt]
    if not all(ids):
        raise DataError("a prompt encodes to no tokens; pass --prompt with some text")
    prompt, lengths = right_pad(ids, device=args.device)
    out = generate(gpt, prompt, args.max_new_tokens, args.temperature, args.top_k,
                   torch.Generator().manual_seed(args.seed), eos=tok.eod, lengths=lengths,
                   graph=args.device.startswith("cuda") and not args.eager)
    print(f"# {step_dir}", file=sys.stderr)
    new = out.shape[1] - prompt.shape[1]  # new tokens per row (all rows stop together)
    for row, n in zip(out.tolist(), lengths.tolist()):
        print(tok.decode(row[:n + new]))


if __name__ == "__main__":
    raise SystemExit(main())
