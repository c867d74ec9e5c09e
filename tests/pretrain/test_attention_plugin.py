"""An attention type added from outside keel is one file, one registration and one YAML: this file
defines shared-KV attention (one projection per KV head serves as key and value; an option of its own,
`attention.kv_heads`), registers it, and the type then trains, checkpoints, resumes exactly and decodes
with its KV cache like keel's own, without a change to keel's files. Registered in this process by a
fixture (and removed after), and in keel's processes by a plugin module named in KEEL_PLUGINS."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from models.attention import ATTENTION_TYPES, register
from models.attention.base import AttentionConfig, check_key_value_heads
from models.attention.common import apply_rope, divide, rope_angles, tp_size
from tests.helpers import ROOT, losses, metrics, run_keel, tiny_overrides


class SharedKVAttention(MegatronModule):
    """q = RoPE(W_q x) per head; kv = RoPE(W_kv x) per KV head is both the key and the value."""

    def __init__(self, config, submodules: dict, layer_number: int, kv_heads: int, attn_mask_type=None, **_unused):
        super().__init__(config=config)
        d, n = config.kv_channels, tp_size()
        self.head_dim = d
        self.heads = divide(config.num_attention_heads, n, "query heads over tensor-parallel ranks")
        self.kv_heads = divide(kv_heads, n, "shared KV heads over tensor-parallel ranks")
        linear = dict(config=config, init_method=config.init_method, bias=False, skip_bias_add=False,
                      is_expert=False, gather_output=False)
        self.linear_q = build_module(submodules["linear_q"], config.hidden_size, config.num_attention_heads * d,
                                     **linear)
        self.linear_kv = build_module(submodules["linear_q"], config.hidden_size, kv_heads * d, **linear)
        self.core_attention = build_module(submodules["core_attention"], config=config, layer_number=layer_number,
                                           attn_mask_type=attn_mask_type, softmax_scale=d ** -0.5)
        self.linear_proj = build_module(
            submodules["linear_proj"], config.num_attention_heads * d, config.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=False, input_is_parallel=True, skip_bias_add=True,
            is_expert=False)

    def qkv(self, x, table):
        s, b, _ = x.shape
        q = apply_rope(self.linear_q(x)[0].view(s, b, self.heads, self.head_dim), table)
        kv = apply_rope(self.linear_kv(x)[0].view(s, b, self.kv_heads, self.head_dim), table)
        return q, kv

    def forward(self, hidden_states, attention_mask=None, rotary_pos_emb=None, attn_mask_type=None, **_unused):
        q, kv = self.qkv(hidden_states, rope_angles(rotary_pos_emb, "shared-KV attention"))
        return self.linear_proj(self.core_attention(q, kv, kv, attention_mask, attn_mask_type=attn_mask_type))


@dataclass
class SharedKV(AttentionConfig):
    type: str = "shared_kv"
    kv_heads: Optional[int] = None  # None: one
    name = "shared_kv"

    def sizes(self) -> tuple[str, ...]:
        return ("kv_heads",)

    def query_groups(self, heads: int) -> int:
        return self.kv_heads or 1

    def spec(self, model):
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer.enums import AttnMaskType

        from models.attention.sdpa import SDPACoreAttention

        return ModuleSpec(module=SharedKVAttention,
                          params={"kv_heads": self.kv_heads or 1, "attn_mask_type": AttnMaskType.causal},
                          submodules={"linear_q": ColumnParallelLinear, "core_attention": SDPACoreAttention,
                                      "linear_proj": RowParallelLinear})

    def check(self, model, tensor_parallel: int) -> None:
        check_key_value_heads(self.query_groups(model.heads), model.heads, tensor_parallel, "kv_heads")

    def cache_elements(self, model, tensor_parallel: int = 1) -> int:
        return max(self.query_groups(model.heads) // tensor_parallel, 1) * model.kv_channels

    def cache_layout(self, module):
        return {"kv": (module.kv_heads, module.head_dim)}

    def decode_step(self, module, x, table, cache, layer, upto, absorbed=True):
        from models.inference.cache import attend_cached

        q, kv = module.qkv(x, table)
        cache.write(layer, {"kv": kv})
        c = cache.read(layer, upto)
        out = attend_cached(cache, q, c["kv"], c["kv"], module.head_dim ** -0.5, tied=True)
        return module.linear_proj(out.flatten(2))[0]


@pytest.fixture
def plugin(tmp_path):
    """The type registered in this process (and removed after), its YAML on Hydra's search path, and the
    plugin module that registers it in keel's processes; the overrides that select it."""
    register(SharedKV)
    (tmp_path / "plugin").mkdir()
    (tmp_path / "plugin" / "shared_kv_plugin.py").write_text(textwrap.dedent("""
        from models.attention import register
        from tests.pretrain.test_attention_plugin import SharedKV

        register(SharedKV)
    """))
    (tmp_path / "conf" / "attention").mkdir(parents=True)
    (tmp_path / "conf" / "attention" / "shared_kv.yaml").write_text("type: shared_kv\nkv_heads: 2\n")
    yield ["attention=shared_kv", f"hydra.searchpath=[file://{tmp_path / 'conf'}]"], tmp_path / "plugin"
    ATTENTION_TYPES.pop(SharedKV.name)


def _run_with_plugin(overrides: list[str], plugin_dir, monkeypatch) -> None:
    """A keel process that imports the plugin first (KEEL_PLUGINS), as a user's own package would be."""
    with monkeypatch.context() as env:
        env.setenv("KEEL_PLUGINS", "shared_kv_plugin")
        env.setenv("PYTHONPATH", f"{plugin_dir}:{ROOT}")  # the plugin, and this test module it imports
        run_keel(overrides)


def test_a_type_from_outside_keel_trains_checkpoints_resumes_and_decodes(plugin, tiny_data, tmp_path, megatron_world,
                                                                         monkeypatch):
    from pretrain.config import compose_config

    plugin, plugin_dir = plugin
    # 1. composed like keel's own: its YAML, its own option, its rules
    cfg = compose_config(plugin + ["attention.kv_heads=4"])
    assert cfg.attention == SharedKV(kv_heads=4) and cfg.attention.query_groups(cfg.model.heads) == 4
    with pytest.raises(ValueError, match=r"attention.kv_heads=3 must divide the 4 heads"):
        compose_config(plugin + ["attention.kv_heads=3", "model.hidden_size=64", "model.head_dim=16"])
    with pytest.raises(ValueError, match=r"attention.rope_dim=8 is not an option of attention=shared_kv"):
        compose_config(plugin + ["attention.rope_dim=8"])
    # 2. trains; stopped at step 3 and resumed, it ends where the run that was not stopped ends
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    _run_with_plugin(tiny_overrides(tiny_data, whole) + plugin, plugin_dir, monkeypatch)
    _run_with_plugin(tiny_overrides(tiny_data, halves) + plugin + ["trainer.stop_at=3"], plugin_dir, monkeypatch)
    _run_with_plugin(tiny_overrides(tiny_data, halves) + plugin, plugin_dir, monkeypatch)
    assert losses(halves) == losses(whole) and len(losses(whole)) == 6
    assert metrics(whole)[-1]["loss"] < metrics(whole)[0]["loss"]
    # 3. decodes with its own cache layout: cached steps equal one full forward
    from models.inference import forward_cached, new_cache
    from tests.helpers import build_tiny_gpt

    tiny, gpt = build_tiny_gpt(plugin + ["model.init_std=0.2"])
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = gpt(tokens, torch.arange(9)[None].expand(2, -1), None)
    cache = new_cache(gpt, 2, 9)
    assert cache.elements_per_token() == tiny.attention.cache_elements(tiny.model) == 2 * 16  # 2 KV heads of 16
    steps = [forward_cached(gpt, tokens[:, :4], cache)] + [forward_cached(gpt, tokens[:, i:i + 1], cache)
                                                           for i in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-4)
