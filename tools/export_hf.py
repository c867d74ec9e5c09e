"""Export a keel checkpoint as a Hugging Face model folder, in the family it was imported from.

    python tools/export_hf.py --checkpoint RUN_OR_CKPT --output HF_DIR [--dtype fp32|bf16]

HF_DIR gets config.json, model.safetensors and the run's tokenizer files, and loads with
`AutoModelForCausalLM.from_pretrained(HF_DIR)`, no extra code. Padded vocabulary rows are dropped. The
class is the family recorded at import (run_info.json's `imported_from`, followed through `init_from`
of continued runs); a model keel trained from scratch is written as the first family that holds it exactly
(models/hf.py's EXPORT_ORDER: Llama for a dense model, Mixtral or Qwen3-MoE for an MoE). MHA/GQA/MQA
models with RoPE, RMSNorm, SwiGLU and a final norm export; GTA/GLA/MLA, and models no family holds (say,
an MoE with dense layers and no QK-norm), are refused in one line. A run whose tokenizer is a sentencepiece
model exports with --without-tokenizer (transformers cannot read keel's sentencepiece models as they are).

The folder is written under a temporary name and renamed when complete. Exit codes: 0 done, 2 a bad
input (one line on stderr).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from models.config import ConfigError
from pretrain import cpu_compat  # noqa: F401  (silences megatron's import warnings)
from tools.hf_folder import atomic_folder, in_tool_world

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ExportError(ConfigError):
    """An export keel refuses; the message is one line."""


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite:
        raise ExportError(f"output {output} already exists; pass --overwrite or choose another --output")


def _check_run(checkpoint: str, with_tokenizer: bool):
    """(step folder, config, tokenizer) of the checkpoint, checked exportable, before the model is built."""
    from data.tokenizer import HFTokenizer, load_tokenizer
    from models.hf import export_family
    from pretrain.checkpoint import resolve
    from tools.generate import run_folder, saved_config

    step_dir = resolve(checkpoint)
    cfg, info = saved_config(run_folder(step_dir))
    family = export_family(cfg.model, cfg.attention, recorded_architecture(info))
    tokenizer = load_tokenizer(info["tokenizer"]["path"])
    if with_tokenizer and not isinstance(tokenizer, HFTokenizer):
        raise ExportError(f"the run's tokenizer {tokenizer.path} is a sentencepiece model, which transformers cannot "
                          "read as it is; pass --without-tokenizer to export the weights and config only")
    return step_dir, cfg, tokenizer, family


def recorded_architecture(info: dict, hops: int = 16) -> str | None:
    """The Hugging Face class the run's weights were imported as: its own run_info.json's, or that of the
    run its `init_from` names, and so on (None: trained from scratch)."""
    from pretrain.rundir import find_run_folder, read_run_info

    for _ in range(hops):
        if "imported_from" in info:
            return info["imported_from"].get("architecture")
        source = (info.get("config") or {}).get("init_from")
        folder = find_run_folder(Path(source)) if source else None
        if folder is None:
            return None
        info = read_run_info(folder)
    return None


def hf_state(gpt: torch.nn.Module, family, cfg, vocab: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HF's tensors of a keel model of one process, in `dtype` (tied: lm_head is embed_tokens)."""
    from models.hf import to_hf

    params = {name: p.detach() for name, p in gpt.named_parameters()}
    return {name: t.to(dtype) for name, t in to_hf(params.__getitem__, family, cfg.model, cfg.attention, vocab)}


def write_folder(folder: Path, tensors: dict, config: dict, config_class: str, tokenizer) -> None:
    import transformers
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    hf_config = getattr(transformers, config_class)(**config)
    hf_config.save_pretrained(str(folder))
    GenerationConfig.from_model_config(hf_config).save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer.save(folder)


def export_model(checkpoint: str | Path, output: str | Path, dtype: str = "fp32", with_tokenizer: bool = True,
                 overwrite: bool = False) -> Path:
    """A keel run or checkpoint -> HF_DIR; needs a megatron world of one process."""
    from models.hf import hf_config
    from models.inference import build_for_decode
    from pretrain import checkpoint as ckpt
    from pretrain.run import model_signature

    output = Path(output).absolute()
    # 1. everything checked before the model is built
    _check_output(output, overwrite)
    step_dir, cfg, tokenizer, family = _check_run(str(checkpoint), with_tokenizer)
    vocab, _ = cfg.model.vocab_rows(tokenizer.vocab_size)
    # 2. the weights of one process, converted
    gpt = build_for_decode(cfg.model, cfg.attention, tokenizer.vocab_size, cfg.seed)
    ckpt.load(step_dir, gpt, None, model_signature(cfg, tokenizer.vocab_size))
    tensors = hf_state(gpt, family, cfg, vocab, DTYPES[dtype])
    special = {"bos_token_id": tokenizer.bos, "eos_token_id": tokenizer.eod, "pad_token_id": tokenizer.pad,
               "dtype": str(DTYPES[dtype]).removeprefix("torch.")}
    # 3. written under a temporary name, renamed when complete
    with atomic_folder(output) as tmp:
        write_folder(tmp, tensors, hf_config(family, cfg.model, cfg.attention, vocab, special), family.config_class,
                     tokenizer if with_tokenizer else None)
    return output


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a keel run folder, its checkpoints folder or a step_N folder")
    p.add_argument("--output", required=True, help="Hugging Face model folder to write")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the written weights")
    p.add_argument("--without-tokenizer", action="store_true", help="write no tokenizer files")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = p.parse_args(argv)
    code, out = in_tool_world("export_hf.py", lambda: export_model(
        args.checkpoint, args.output, args.dtype, not args.without_tokenizer, args.overwrite))
    if code:
        return code
    print(f"wrote {out}: AutoModelForCausalLM.from_pretrained({str(out)!r}) loads it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
