"""Extending keel from outside: an attention type and a callback, each one file's worth of code and one
registration, without a change to keel's files.

This file defines shared-KV attention (one projection per KV head serves as key and value; an option of
its own, `attention.kv_heads`) and a callback (`LossEMA`: a smoothed loss, with state and a summary
line). A plugin module named in KEEL_PLUGINS registers both in keel's processes, as a user's package
would; then the type trains, checkpoints, resumes exactly and decodes with its KV cache like keel's
own, and the callback runs at its declared place in the order, logs, saves and restores its state with
the checkpoint and adds its line to the run summary. In this process a fixture registers them (and
removes them after)."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import pytest
import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from models.attention import ATTENTION_TYPES, register
from models.attention.base import AttentionConfig, check_key_value_heads
from models.attention.common import apply_rope, divide, rope_angles, tp_size
from pretrain.callbacks import CALLBACKS, Callback, Ranks, register as register_callback
from tests.helpers import ROOT, losses, metrics, resume_folder, run_keel, tiny_overrides


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


class LossEMA(Callback):
    """An exponential moving average of the training loss, logged as `loss_ema` with every row."""

    name, order, ranks = "loss_ema", 50, Ranks.main  # after the spike detector (10), before the logger (100)
    decay = 0.9

    def __init__(self):
        self.ema: float | None = None

    def on_step_end(self, trainer, metrics: dict) -> None:
        loss = metrics["loss"]
        self.ema = loss if self.ema is None else self.decay * self.ema + (1 - self.decay) * loss
        metrics["loss_ema"] = self.ema

    def state_dict(self) -> dict:
        return {"ema": self.ema}

    def load_state_dict(self, state: dict) -> None:
        self.ema = state["ema"]

    def summary(self, rows: list[dict]) -> dict[str, str]:
        return {"loss ema": f"{self.ema:.4f}"}


PLUGIN = """
from models.attention import register
from pretrain.callbacks import register as register_callback
from tests.pretrain.test_plugins import LossEMA, SharedKV

register(SharedKV)
register_callback(LossEMA)
"""


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """The plugin module that registers both in keel's processes, the type's YAML on Hydra's search path,
    and the overrides that select the type."""
    root = tmp_path_factory.mktemp("plugin")
    (root / "plugin").mkdir()
    (root / "plugin" / "keel_test_plugin.py").write_text(PLUGIN)
    (root / "conf" / "attention").mkdir(parents=True)
    (root / "conf" / "attention" / "shared_kv.yaml").write_text("type: shared_kv\nkv_heads: 2\n")
    return ["attention=shared_kv", f"hydra.searchpath=[file://{root / 'conf'}]"], root / "plugin"


@pytest.fixture
def registered():
    """Both registered in this process, and removed after."""
    register(SharedKV)
    register_callback(LossEMA)
    yield
    ATTENTION_TYPES.pop(SharedKV.name)
    CALLBACKS.pop(LossEMA.name)


@pytest.fixture(scope="module")
def runs(plugin, tiny_data, tmp_path_factory):
    """Keel processes that import the plugin first (KEEL_PLUGINS): a 6-step run, and the same run resumed from
    its step-3 checkpoint (steps 4-6); the resumed process's output."""
    overrides, plugin_dir = plugin
    whole = tmp_path_factory.mktemp("whole") / "run"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("KEEL_PLUGINS", "keel_test_plugin")
        env.setenv("PYTHONPATH", f"{plugin_dir}:{ROOT}")  # the plugin, and this test module it imports
        run_keel(tiny_overrides(tiny_data, whole) + overrides)
        halves = resume_folder(whole, 3, tmp_path_factory.mktemp("halves") / "run")
        resumed = run_keel(tiny_overrides(tiny_data, halves) + overrides)
    return whole, halves, resumed.stdout


def test_a_type_from_outside_keel_trains_checkpoints_resumes_and_decodes(plugin, registered, runs, megatron_world):
    from pretrain.config import compose_config

    plugin, _ = plugin
    whole, halves, _ = runs
    # 1. composed like keel's own: its YAML, its own option, its rules
    cfg = compose_config(plugin + ["attention.kv_heads=4"])
    assert cfg.attention == SharedKV(kv_heads=4) and cfg.attention.query_groups(cfg.model.heads) == 4
    with pytest.raises(ValueError, match=r"attention.kv_heads=3 must divide the 4 heads"):
        compose_config(plugin + ["attention.kv_heads=3", "model.hidden_size=64", "model.head_dim=16"])
    with pytest.raises(ValueError, match=r"attention.rope_dim=8 is not an option of attention=shared_kv"):
        compose_config(plugin + ["attention.rope_dim=8"])
    # 2. trains; resumed from step 3, it ends where the run that was not stopped ends
    assert losses(halves) == {step: loss for step, loss in losses(whole).items() if step > 3}
    assert sorted(losses(whole)) == [1, 2, 3, 4, 5, 6]
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


def test_a_callback_from_outside_keel_runs_in_its_order_resumes_and_sums_up(registered, runs, tiny_data, tmp_path):
    from pretrain.callbacks import RunContext, build_callbacks
    from pretrain.config import compose_config

    whole, halves, resumed = runs
    # 1. built by name in its declared order: after the spike detector, before rank 0's metrics logger,
    #    and not at all on another rank
    cfg = compose_config(tiny_overrides(tiny_data, tmp_path) + ["logging.monitors.interval=0"])
    main, other = (RunContext(cfg, SimpleNamespace(is_main=rank == 0), tmp_path, None, None) for rank in (0, 1))
    assert list(build_callbacks(main)) == ["spike", "loss_ema", "metrics"]
    assert list(build_callbacks(other)) == ["spike"]
    with pytest.raises(ValueError, match=r"^callback 'spike' is registered already"):
        register_callback(type("Spike", (LossEMA,), {"name": "spike"}))
    # 2. in a training run it adds to every row before the logger writes it
    ema = {r["step"]: r["loss_ema"] for r in metrics(whole)}
    assert list(ema) == [1, 2, 3, 4, 5, 6] and ema[1] == metrics(whole)[0]["loss"]
    # 3. its state goes into the checkpoint and comes back: resumed from step 3, it smooths on from step 3's
    #    average, so every step matches the run that was not stopped (bit for bit)
    assert {r["step"]: r["loss_ema"] for r in metrics(halves)} == {step: v for step, v in ema.items() if step > 3}
    assert ema[4] != {r["step"]: r["loss"] for r in metrics(halves)}[4]  # what it would log restarted bare
    # 4. its summary line, among the callbacks' lines in their call order
    assert f"  loss ema         {ema[6]:.4f}\n" in resumed
    assert resumed.index("  loss spikes ") < resumed.index("  loss ema ") < resumed.index("  metrics ")
