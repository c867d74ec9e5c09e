"""Width rules for the peak LR per group (optim/lr_rules.py) and how they reach megatron's optimizer."""

import pytest
import torch

from optim.lr_rules import GROUPS, PRESETS, default_alpha, group_exponents, peak_lrs, transfer_lr
from optim.config import LayerwisePreset
from optim.config import LayerwiseConfig, OptimConfig
from models.config import ModelConfig
from tests.helpers import build_tiny_gpt

WIDTHS = (32, 64, 128, 512)


def _model(width: int, tied: bool = True) -> ModelConfig:
    return ModelConfig(hidden_size=width, head_dim=16, tie_embeddings=tied)


def test_global_ignores_width():
    for n in WIDTHS:
        assert peak_lrs(OptimConfig(lr=3e-3), _model(n)) == dict.fromkeys(GROUPS, 3e-3)


@pytest.mark.parametrize("name, clip, alpha", [("adamw", 1.0, 0.42), ("sgd", 1.0, 0.38), ("sgd", 0.0, 0.5)])
def test_sp_width_defaults_to_the_papers_exponent(name, clip, alpha):
    # Haas et al. 2025: Adam + trainable LN -0.42, SGD + clipping -0.38, SGD without clipping -0.5
    cfg = OptimConfig(name=name, grad_clip=clip, lr=1e-2, lr_rule="sp_width", base_width=64)
    assert default_alpha(cfg) == alpha
    for n in WIDTHS:
        assert peak_lrs(cfg, _model(n)) == pytest.approx(dict.fromkeys(GROUPS, 1e-2 * (n / 64) ** -alpha))


def test_sp_width_explicit_exponent_and_transfer():
    cfg = OptimConfig(lr=2e-3, lr_rule="sp_width", base_width=128, width_exponent=0.3)
    assert peak_lrs(cfg, _model(128)) == dict.fromkeys(GROUPS, 2e-3)  # n = n0 gives optim.lr
    assert peak_lrs(cfg, _model(512))["hidden"] == pytest.approx(2e-3 * 4 ** -0.3)
    assert transfer_lr(2e-3, 128, 512, 0.3) == pytest.approx(peak_lrs(cfg, _model(512))["hidden"])


@pytest.mark.parametrize("preset", list(LayerwisePreset))
def test_layerwise_presets_untied(preset):
    cfg = OptimConfig(lr=1e-2, lr_rule="layerwise", base_width=32, layerwise=LayerwiseConfig(preset=preset))
    for n in WIDTHS:
        lrs = peak_lrs(cfg, _model(n, tied=False))
        assert lrs == pytest.approx({g: 1e-2 * (n / 32) ** -PRESETS[preset][g] for g in GROUPS})


def test_layerwise_preset_values_and_overrides():
    # the paper's layerwise maximal stable rates (readout n^-1, hidden n^-1/2, embedding/norm n^0)
    assert PRESETS["max_stable"] == {"embedding": 0.0, "hidden": 0.5, "readout": 1.0, "norm": 0.0}
    # Everett et al. 2024, Adam: embedding Theta(1), hidden 1/n, readout 1/n
    assert PRESETS["everett_adam"] == {"embedding": 0.0, "hidden": 1.0, "readout": 1.0, "norm": 0.0}
    cfg = OptimConfig(lr_rule="layerwise", layerwise=LayerwiseConfig(hidden=0.7, norm=0.25))
    expected = {"embedding": 0.0, "hidden": 0.7, "readout": 1.0, "norm": 0.25}
    assert group_exponents(cfg, _model(64, tied=False)) == expected


def test_tied_matrix_takes_the_stricter_exponent():
    cfg = OptimConfig(lr_rule="layerwise")
    assert group_exponents(cfg, _model(64, tied=True))["embedding"] == 1.0
    cfg = OptimConfig(lr_rule="layerwise", layerwise=LayerwiseConfig(embedding=1.5))
    assert group_exponents(cfg, _model(64, tied=True))["embedding"] == 1.5


def test_config_validation():
    with pytest.raises(ValueError, match="optim.layerwise.preset"):
        LayerwiseConfig(preset="mup")
    with pytest.raises(ValueError, match="optim.lr_rule"):
        OptimConfig(lr_rule="width")
    with pytest.raises(ValueError, match="optim.base_width"):
        OptimConfig(base_width=0)


# ---- on a real keel GPT ------------------------------------------------------------------------
MODEL_VARIANTS = [[], ["model.tie_embeddings=false"], ["model.position_embedding=learned_absolute"],
                  ["model.tie_embeddings=false", "model.position_embedding=learned_absolute",
                   "model.normalization=LayerNorm", "model.activation=gelu"]]


@pytest.mark.parametrize("overrides", MODEL_VARIANTS)
def test_every_parameter_lands_in_exactly_one_group(megatron_world, overrides):
    from optim.lr_rules import param_group
    from optim.optimizer import _group_overrides

    cfg, gpt = build_tiny_gpt(overrides)
    named = list(gpt.named_parameters())
    groups = {name: param_group(name, p) for name, p in named}
    assert set(groups.values()) <= set(GROUPS)
    # readout exists exactly when untied; learned positions are embeddings; 1-D params are norms
    assert ("readout" in groups.values()) == (not cfg.model.tie_embeddings)
    assert all(g == "embedding" for n, g in groups.items() if "position_embeddings" in n)
    assert all(groups[n] == "norm" for n, p in named if p.ndim == 1)
    assert {g for g in groups.values()} >= {"embedding", "hidden", "norm"}
    # distinct LRs per group, so megatron's predicates must partition the parameters exactly
    lrs = dict(zip(GROUPS, (1.0, 2.0, 3.0, 4.0)))
    predicates = [key.with_name_predicate.fn for key in _group_overrides(lrs, 1.0)]
    for name, p in named:
        assert sum(fn(p, name) for fn in predicates) == 1, name


@pytest.mark.parametrize("rule", ["sp_width", "layerwise"])
def test_effective_lr_per_group_follows_the_formula_across_widths(megatron_world, rule):
    from models.builder import build_model
    from optim.lr_rules import param_group
    from optim.optimizer import build_optimizer

    for width in (32, 64, 128):
        over = [f"model.hidden_size={width}", "model.tie_embeddings=false", f"optim.lr_rule={rule}",
                "optim.base_width=64", "optim.lr=1e-2"]
        cfg, _ = build_tiny_gpt(over)
        built = build_model(cfg.model, cfg.attention, 128, torch.device("cpu"), torch.float32, cfg.seed)
        peaks = peak_lrs(cfg.optim, cfg.model)
        optimizer = build_optimizer(cfg.optim, cfg.model, built.ddp, built.gpt, torch.float32)
        assert optimizer.peak_lrs == peaks
        logged = optimizer.set_lr(0.5)  # the schedule's factor multiplies every group's peak
        exps = group_exponents(cfg.optim, cfg.model)
        for g in GROUPS:
            assert logged[f"lr/{g}"] == pytest.approx(0.5 * 1e-2 * (width / 64) ** -exps[g])
        group_of = {id(p): param_group(n, p) for n, p in built.gpt.named_parameters()}
        seen = set()
        for pg in optimizer.param_groups:
            for p in pg["params"]:
                assert pg["lr"] == pytest.approx(logged[f"lr/{group_of[id(p)]}"])
                seen.add(id(p))
        assert seen == set(group_of)  # every parameter is optimized, once


def test_the_last_pipeline_stages_copy_of_tied_embeddings_is_the_embedding():
    import torch

    from optim.lr_rules import param_group

    copy = torch.nn.Parameter(torch.zeros(8, 4))
    assert param_group("output_layer.weight", copy) == "readout"  # untied: its own matrix
    copy.shared_embedding = True  # megatron's mark on the last stage's copy of the tied matrix
    assert param_group("output_layer.weight", copy) == "embedding"
