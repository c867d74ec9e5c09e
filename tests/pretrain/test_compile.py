"""trainer.compile on CPU (inductor's C++ backend): the compiled smoke model trains as the eager one
does, without graph breaks or a fall back to eager, and the stability monitors, which then take an
eager reference pass, report the eager model's values. A compile error falls back with one warning.

tools/gpu_check.sh (section 20) runs this file on a GPU: 20 steps in bf16, at bf16's tolerance."""

import pytest
import torch

from tests.helpers import tiny_overrides

GPU = torch.cuda.is_available()
STEPS = 20 if GPU else 2
# fp32 on CPU: only summation order differs. bf16 on a GPU: fused kernels round differently and the
# difference grows over 20 updates; the monitors are compared at step 1, before any update differs
LOSS_REL, MONITOR_REL = (2e-2, 5e-2) if GPU else (1e-4, 1e-4)


def _train(tiny_data, run_dir, world, extra: list[str]):
    """(the trainer, each step's metrics with the stability monitor's) over STEPS steps."""
    from pretrain.config import compose_config
    from pretrain.run import build_trainer

    # documents masked: on a GPU the compiled layers take FlexAttention block masks, the eager ones dense masks
    cfg = compose_config(tiny_overrides(tiny_data, run_dir, steps=STEPS) + ["logging.monitors.interval=1",
                                                                         "data.document_mask=true"] + extra)
    trainer = build_trainer(cfg, world, run_dir)
    rows = []
    for _ in range(STEPS):
        metrics = trainer.train_step()
        trainer.callbacks["stability"].on_step_end(trainer, metrics)
        rows.append(metrics)
    return trainer, rows


@pytest.fixture(scope="module")
def eager_rows(tiny_data, megatron_world, tmp_path_factory):
    trainer, rows = _train(tiny_data, tmp_path_factory.mktemp("eager"), megatron_world, ["trainer.compile=false",
                                                                                       "model.loss_chunk=0"])
    assert trainer.compiled is None and trainer.forward_is_plain  # on a GPU the loss is chunked unless told not to
    return rows


def _assert_rows_match(rows, reference, loss_rel, monitor_rel):
    assert len(rows) == len(reference) == STEPS
    for got, want in zip(rows, reference):
        assert got["loss"] == pytest.approx(want["loss"], rel=loss_rel), got["step"]
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=2 * loss_rel), got["step"]
    first, want = rows[0], reference[0]
    stability = [k for k in want if k.startswith("stability/")]
    assert len(stability) > 20 and any("attn_entropy" in k for k in stability) and "stability/logit_max" in want
    for key in stability:
        assert first[key] == pytest.approx(want[key], rel=monitor_rel, abs=1e-6), key


def test_compiled_layers_train_like_eager_ones(tiny_data, megatron_world, tmp_path, eager_rows, capfd):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    # a chunked loss too: with both, nothing of the training forward is left for the monitors to hook
    trainer, rows = _train(tiny_data, tmp_path, megatron_world, ["trainer.compile=true", "model.loss_chunk=64"])
    assert trainer.compiled.active and not trainer.forward_is_plain  # never fell back to eager
    assert trainer.block_masks == GPU
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters["graph_break"])
    assert "torch.compile failed" not in capfd.readouterr().err
    # one fused AdamW kernel over the fp32 main parameters on a GPU; torch's per-parameter loop on CPU
    from optim.megatron_private import chained

    assert {bool(g.get("fused")) for o in chained(trainer.optimizer.megatron) for g in o.optimizer.param_groups} == {GPU}
    _assert_rows_match(rows, eager_rows, LOSS_REL, MONITOR_REL)


def test_a_compile_error_falls_back_to_eager_with_one_warning(tiny_data, megatron_world, tmp_path, eager_rows,
                                                              capfd, monkeypatch):
    from models import compile as compile_module

    def broken(graph, example_inputs):
        raise RuntimeError("no compiler here")

    torch._dynamo.reset()
    monkeypatch.setattr(compile_module, "BACKEND", broken)
    trainer, rows = _train(tiny_data, tmp_path, megatron_world, ["trainer.compile=true", "model.loss_chunk=0"])
    assert not trainer.compiled.active and trainer.forward_is_plain
    err = [line for line in capfd.readouterr().err.splitlines() if "torch.compile failed" in line]
    assert len(err) == 1 and "no compiler here" in err[0]
    _assert_rows_match(rows, eager_rows, 0, 0)


@pytest.mark.parametrize("attention", ["mha", "gqa", "mqa", "gta", "gla", "mla"])
def test_no_attention_type_breaks_the_compiled_graph(megatron_world, attention):
    """Each layer compiles to one graph for every attention type, with QK-norm and a dense document mask
    (the CPU's and eager GPU's path). Graph breaks come from tracing, not from the backend, so dynamo's
    "eager" backend counts them at no compile cost. Before: GTA broke 6 times and GLA/MLA 8, each at a
    megatron mapping that looked its group up through a `warnings.warn` (models/attention/common.py)."""
    from torch._dynamo.utils import counters

    from models.compile import CompiledLayers
    from tests.helpers import DEVICE, build_tiny_gpt

    torch._dynamo.reset()
    counters.clear()
    _, gpt = build_tiny_gpt([f"attention={attention}", "attention.qk_norm=true"], device=DEVICE)
    gpt.train()
    CompiledLayers(gpt.decoder.layers, backend="eager")
    tokens = torch.randint(0, 128, (2, 16), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    positions = torch.arange(16, device=DEVICE)[None].expand(2, -1)
    causal = torch.ones(16, 16, dtype=torch.bool, device=DEVICE).tril()
    documents = torch.arange(16, device=DEVICE) // 8  # two documents of 8 tokens
    masked = ~(causal & (documents[:, None] == documents[None]))[None, None].expand(2, 1, 16, 16)
    for mask in (None, masked):
        gpt(tokens, positions, mask, labels=tokens).sum().backward()
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters["graph_break"])
