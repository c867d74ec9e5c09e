"""Import a Hugging Face model (Llama, Mistral, Qwen2/2.5, Qwen3, Mixtral, Qwen2-MoE, Qwen3-MoE) as a keel
checkpoint, for continual pretraining.

    python tools/import_hf.py --model HF_DIR --output CKPT_DIR [--tokenizer T] [--vocab-multiple 128]
    python pretrain/main.py init_from=CKPT_DIR data.tokenizer=CKPT_DIR/tokenizer data.sources=... ...

CKPT_DIR is laid out like a keel run folder, so `init_from`, tools/generate.py, tools/evaluate.py and
tools/export_hf.py all take it:
- `checkpoints/step_00000000/`: the weights (megatron's dist_checkpointing: any TP/PP layout loads them);
- `run_info.json`: keel's config with the model resolved from config.json; `init_from=CKPT_DIR` takes
  its `model` and `attention` from here, so the architecture is never typed by hand;
- `tokenizer/`: the model's tokenizer (HF_DIR's, or --tokenizer).

Supported: the families of models/hf.py (`FAMILIES`), each without a sliding window in use; the family is
recorded in run_info.json (`imported_from.architecture`) and tools/export_hf.py writes it back. Weights
come from safetensors only, unless --allow-pickle. Everything is written under a
temporary name and renamed when complete. Exit codes: 0 done, 2 a bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from pretrain import cpu_compat  # noqa: F401  (silences megatron's import warnings)
from tools.hf_folder import FolderError, Weights, atomic_folder, check_folder, in_tool_world, read_config

DEFAULT_VOCAB_MULTIPLE = 128  # padded rows divide by any power-of-two tensor-parallel size up to 128


def check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite:
        raise FolderError(f"output {output} already exists; pass --overwrite or choose another --output")


def resolve(hf_dir: Path, tokenizer_path: str | None, vocab_multiple: int, allow_pickle: bool):
    """(keel config, weights, tokenizer, HF config) for HF_DIR, every input checked; nothing heavy yet."""
    from data.config import DataConfig
    from data.tokenizer import load_tokenizer
    from models.attention import attention_config
    from models.config import ModelConfig, MoEConfig, RopeScalingConfig, check_vocabulary
    from models.hf import family_of, hf_shapes, keel_architecture
    from pretrain.config import KeelConfig

    # 1. the architecture, from config.json
    hf = read_config(check_folder(hf_dir))
    model, attention = keel_architecture(hf, vocab_multiple)
    model = ModelConfig(**{**model, "rope_scaling": RopeScalingConfig(**model["rope_scaling"]),
                           "moe": MoEConfig(**model["moe"])})
    attention = attention_config(attention)
    # 2. the weights: every tensor config.json implies, with its shape (headers only)
    weights = Weights(hf_dir, allow_pickle)
    weights.check_shapes(hf_shapes(family_of(hf), model, attention))
    # 3. the tokenizer must fit the model's vocabulary
    tokenizer = load_tokenizer(tokenizer_path or hf_dir)
    check_vocabulary(tokenizer.vocab_size, model.vocab_size, f"tokenizer {tokenizer.path}", str(hf_dir))
    seq_len = min(DataConfig().seq_len, model.max_seq_len)
    cfg = KeelConfig(name="import", model=model, attention=attention, data=DataConfig(seq_len=seq_len))
    return cfg, weights, tokenizer, hf


@torch.no_grad()
def load_weights(gpt: torch.nn.Module, weights: Weights, family, cfg) -> None:
    """Copy HF's tensors into the keel model of a world of one (every parameter, exactly once)."""
    from models.hf import to_keel

    params = dict(gpt.named_parameters())
    _, padded = cfg.model.vocab_rows(cfg.model.vocab_size)
    for name, tensor in to_keel(weights.get, family, cfg.model, cfg.attention, padded):
        params.pop(name).copy_(tensor)
    if params:
        raise RuntimeError(f"keel parameters without a Hugging Face tensor: {sorted(params)}")


def import_model(hf_dir: str | Path, output: str | Path, tokenizer: str | None = None,
                 vocab_multiple: int = DEFAULT_VOCAB_MULTIPLE, allow_pickle: bool = False,
                 overwrite: bool = False) -> Path:
    """HF_DIR -> a keel checkpoint folder; needs a megatron world of one process (TP=1, PP=1)."""
    from megatron.core import parallel_state

    from models.builder import build_initialised_gpt
    from models.hf import family_of
    from pretrain.checkpoint import Checkpoints, Snapshot
    from pretrain.run import model_signature
    from pretrain.rundir import git_revision, write_json

    hf_dir, output = Path(hf_dir), Path(output).absolute()
    if parallel_state.get_tensor_model_parallel_world_size() * parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise RuntimeError("import_model runs in a world of one process")
    # 1. every input checked before anything heavy
    check_output(output, overwrite)
    cfg, weights, tok, hf = resolve(hf_dir, tokenizer, vocab_multiple, allow_pickle)
    # 2. keel's model with HF's weights
    gpt = build_initialised_gpt(cfg.model, cfg.attention, tok.vocab_size, cfg.seed).eval()
    family = family_of(hf)
    load_weights(gpt, weights, family, cfg)
    # 3. checkpoint, tokenizer and run_info.json under a temporary name; renamed when complete
    with atomic_folder(output) as tmp:
        tok_path = output / tok.save(tmp / "tokenizer").relative_to(tmp)
        cfg.data.tokenizer = str(tok_path)
        weights_only = Snapshot(0, gpt, signature=model_signature(cfg, tok.vocab_size))
        Checkpoints(tmp / "checkpoints", keep_last=1).save(weights_only)
        write_json(tmp / "run_info.json", {
            "config": asdict(cfg), "tokenizer": {**tok.describe(), "path": str(tok_path)},
            "imported_from": {"path": str(hf_dir.absolute()), "architecture": family.architecture,
                              "dtype": str(hf.get("dtype"))},
            "git_revision": git_revision(), "command": " ".join(sys.argv)}, default=str)
    return output


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model folder (config.json, safetensors, tokenizer)")
    p.add_argument("--output", required=True, help="keel checkpoint folder to write")
    p.add_argument("--tokenizer", help="tokenizer.json or folder; default: the model folder's")
    p.add_argument("--vocab-multiple", type=int, default=DEFAULT_VOCAB_MULTIPLE,
                   help="pad the vocabulary rows to a multiple of this (tensor parallelism must divide them)")
    p.add_argument("--allow-pickle", action="store_true", help="also read pickled *.bin/*.pt weights (weights_only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = p.parse_args(argv)
    code, out = in_tool_world("import_hf.py", lambda: import_model(
        args.model, args.output, args.tokenizer, args.vocab_multiple, args.allow_pickle, args.overwrite))
    if code:
        return code
    print(f"wrote {out}; continue pretraining with\n  python pretrain/main.py init_from={out} "
          f"data.tokenizer={out / 'tokenizer'} data.path=PACKED data.val_path=PACKED_VAL run_dir=runs/NAME")
    return 0


if __name__ == "__main__":
    sys.exit(main())
