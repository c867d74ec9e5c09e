"""Tiny Hugging Face models and tokenizers built in the test (nothing is downloaded), for the import,
export and evaluation tests."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 300  # the tiny tokenizer's size; the model may predict more rows
SPECIALS = ["<s>", "</s>", "<pad>"]


def tiny_tokenizer(folder: Path, vocab: int = VOCAB, bos: bool = True) -> Path:
    """A byte-level BPE trained on a few stdlib files, saved as transformers does: BOS first like Llama's, or
    (bos=False) none, like Qwen's, whose documents only end with their EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from data.corpus import stdlib_documents

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([d.text for _, d in zip(range(30), stdlib_documents("code", "train"))], trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>" if bos else None, eos_token="</s>",
                                 pad_token="<pad>")
    hf.save_pretrained(str(folder))
    return folder


def llama_config(vocab: int = VOCAB, tie: bool = False, kv_heads: int = 2, rope: dict | None = None, **extra):
    from transformers import LlamaConfig

    rope = rope or {"rope_type": "llama3", "rope_theta": 5000.0, "factor": 4.0, "low_freq_factor": 2.0,
                    "high_freq_factor": 8.0, "original_max_position_embeddings": 64}
    values = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=kv_heads, max_position_embeddings=128, rms_norm_eps=3e-6,
                  tie_word_embeddings=tie, rope_parameters=rope, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return LlamaConfig(**{**values, **extra})


def family_config(arch: str, vocab: int = 320, **extra):
    """A tiny config of one of keel's Hugging Face families, each with what sets it apart: Qwen2 biases on
    q/k/v and tied embeddings; Qwen3 head_dim 24 with hidden 64 and 4 heads (not hidden / heads); the MoE
    families 4 experts top-2, Qwen's with a dense layer (mlp_only_layers) and Qwen2-MoE's gated shared expert."""
    import transformers

    base = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=3e-6, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6}, bos_token_id=0, eos_token_id=1,
                pad_token_id=2)
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40, mlp_only_layers=[1])
    own = {"Qwen2ForCausalLM": dict(tie_word_embeddings=True, use_sliding_window=False, sliding_window=32,
                                    max_window_layers=1),
           "Qwen3ForCausalLM": dict(head_dim=24),
           "MixtralForCausalLM": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
           "Qwen3MoeForCausalLM": dict(moe, head_dim=24, norm_topk_prob=True),
           "Qwen2MoeForCausalLM": dict(moe, shared_expert_intermediate_size=56, norm_topk_prob=False,
                                       decoder_sparse_step=1)}[arch]
    return getattr(transformers, arch.replace("ForCausalLM", "Config"))(**{**base, **own, **extra},
                                                                         architectures=[arch])


def tiny_family(folder: Path, tokenizer: Path | None, arch: str, seed: int = 0, **extra) -> Path:
    """A randomly initialised tiny model of family `arch` (family_config), saved like tiny_llama."""
    import transformers

    return tiny_llama(folder, tokenizer, family_config(arch, **extra), seed=seed, cls=getattr(transformers, arch))


def tiny_llama(folder: Path, tokenizer: Path | None, config=None, seed: int = 0, shard_size: str | None = None,
               cls=None) -> Path:
    """A randomly initialised tiny Llama (norm gains too, so a misplaced norm shows), saved as safetensors
    (sharded when `shard_size` is given), with the tokenizer files beside it."""
    import shutil

    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = (cls or LlamaForCausalLM)(config or llama_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if p.ndim == 1 else 0.08 * torch.randn_like(p))
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(str(folder), **kwargs)
    if tokenizer is not None:
        for f in Path(tokenizer).iterdir():
            shutil.copy(f, folder / f.name)
    return folder


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        return model(tokens).logits


def keel_logits(gpt, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of a keel GPT at one process, the padded vocabulary rows dropped."""
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return gpt(tokens, positions, None)[..., :gpt.unpadded_vocab_size]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())
