"""Config validation: every bad value fails in __post_init__ with one line naming the fix."""

import pytest
from hydra import compose, initialize_config_dir

from pretrain.config import CheckpointConfig, KeelConfig, ParallelConfig, TrainerConfig, compose_config, register_configs
from models.config import ModelConfig
from optim.config import OptimConfig, ScheduleConfig
from tests.helpers import ROOT

# values that pass a type check but would crash or mislead later: each must stop with one line
BAD_VALUES = [
    (["trainer.eval_batches=0"], "trainer.eval_batches must be positive"),
    (["trainer.eval_batches=-1"], "trainer.eval_batches must be positive"),
    (["trainer.log_interval=0"], "trainer.log_interval must be positive"),
    (["trainer.global_batch_size=0"], "trainer.global_batch_size must be positive"),
    (["trainer.global_batch_size=-8"], "trainer.global_batch_size must be positive"),
    (["optim.spectral.tau=-1"], "optim.spectral.tau must be positive"),
    (["optim.spectral.power_iters=0"], "optim.spectral.power_iters must be >= 1"),
    (["logging.monitors.batch_rows=0"], "logging.monitors.batch_rows must be positive"),
    (["model.loss_chunk=-1"], "model.loss_chunk must be >= 0"),
    (["model.recompute=some"], "model.recompute='some' is unknown; choose one of none, selective, full"),
]


def test_defaults_compose_and_derive_heads_and_ffn():
    cfg = compose_config([])
    assert isinstance(cfg, KeelConfig)
    assert cfg.model.heads == cfg.model.hidden_size // cfg.model.head_dim
    assert cfg.model.ffn_size % 8 == 0 and cfg.model.ffn_size >= 8 * cfg.model.hidden_size // 3
    assert cfg.attention.query_groups(cfg.model.heads) == cfg.model.heads // 2  # GQA by default


PRESETS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_composes(name):
    cfg = compose_config([f"+experiment={name}"])
    assert cfg.name == name


@pytest.mark.parametrize("name", sorted(set(PRESETS) - {"smoke", "demo", "cpt_pretrain"}))
def test_experiment_presets_score_at_least_128k_validation_tokens(name):
    # the comparisons' noise floor: every seed and arm scores these same rows (data.loader.VALIDATION_SEED)
    cfg = compose_config([f"+experiment={name}"])
    assert cfg.trainer.eval_batches * cfg.trainer.global_batch_size * cfg.data.seq_len >= 128 * 1024


def test_the_preset_list_is_complete():
    assert len(PRESETS) >= 12 and {"smoke", "demo", "moe_dense_baseline", "warmup_free_adamw"} <= set(PRESETS)


@pytest.mark.parametrize("override, message", [
    ("+model.hiden_size=128", "unknown config key model.hiden_size; did you mean model.hidden_size?"),
    ("+trainer.evl_interval=3", "unknown config key trainer.evl_interval; did you mean trainer.eval_interval?"),
    ("+typo=1", "unknown config key typo"),
])
def test_unknown_keys_are_refused_even_with_plus(override, message):
    with pytest.raises(ValueError) as err:
        compose_config([override])
    assert str(err.value) == message


def test_required_override_names_exist():
    cfg = compose_config(["run_dir=/tmp/x", "trainer.max_steps=7", "trainer.stop_at=3", "trainer.eval_interval=2",
                        "checkpoint.interval=2", "parallel.tensor=2", "parallel.pipeline=2", "model.hidden_size=128",
                        "optim.lr=0.01", "seed=5"])
    assert (cfg.run_dir, cfg.trainer.max_steps, cfg.trainer.stop_at, cfg.seed) == ("/tmp/x", 7, 3, 5)
    assert (cfg.parallel.tensor, cfg.parallel.pipeline, cfg.model.hidden_size, cfg.optim.lr) == (2, 2, 128, 0.01)


def test_width_knob_keeps_head_dim():
    for width in (64, 128, 256, 512):
        cfg = compose_config([f"model.hidden_size={width}"])
        assert cfg.model.kv_channels == 32 and cfg.model.heads == width // 32 and cfg.model.num_layers == 4
        assert cfg.model.ffn_size == -(-8 * width // 3 // 8) * 8


def test_head_dim_is_independent_of_hidden_over_heads_and_moe_layers_place_experts():
    cfg = compose_config(["model.hidden_size=64", "model.num_heads=4", "model.head_dim=24", "model.num_layers=3",
                          "model.moe.num_experts=4", "model.moe.layers=[1,0,1]"])
    assert (cfg.model.heads, cfg.model.kv_channels) == (4, 24)  # Qwen3's shape: 4 heads of 24 on a width of 64
    assert cfg.model.moe.moe_layers(3) == [1, 0, 1]
    assert compose_config(["model.moe.num_experts=4", "model.moe.every=2"]).model.moe.moe_layers(4) == [1, 0, 1, 0]


@pytest.mark.parametrize("overrides, message", [
    (["model.hidden_size=100"], "not divisible by model.head_dim"),
    (["model.hidden_size=96", "model.head_dim=32", "parallel.tensor=2"], "does not divide the 3 attention heads"),
    (["data.seq_len=4096"], "exceeds model.max_seq_len"),
    (["trainer.stop_at=500", "trainer.max_steps=10"], "trainer.stop_at=500"),
    (["trainer.global_batch_size=6", "trainer.micro_batch_size=4"], "must be a multiple"),
    (["optim.lr=-1"], "optim.lr must be positive"),
    (["lr.name=linear"], "lr.name='linear' is unknown"),
    (["attention.type=sparse"], "attention.type='sparse' is unknown"),
    (["parallel.pipeline=3"], "does not divide model.num_layers"),
    (["optim.name=sgd", "optim.distributed=true"], "Adam-only"),
    (["logging.monitors.spike_window=5"], "logging.monitors.spike_window is now logging.monitors.spike.window"),
    (["logging.monitors.spike.action=explode"], "logging.monitors.spike.action='explode' is unknown"),
    (["logging.monitors.spike.min_count=1"], "logging.monitors.spike: need 2 <= min_count <= window"),
    (["logging.monitors.spike.loss_z=0"], "logging.monitors.spike.loss_z must be positive"),
    (["logging.monitors.spike.rewind.lr_factor=2"], "logging.monitors.spike.rewind.lr_factor must be in (0, 1]"),
    (["logging.monitors.spike.rewind.skips=9", "logging.monitors.spike.rewind.within=4"],
     "logging.monitors.spike.rewind.skips=9 must be <= rewind.within=4"),
    (["optim.beta2=1.0"], "optim.beta2 must be in [0, 1)"),
    (["model.moe.num_experts=4", "parallel.tensor=2", "parallel.sequence=false"],
     "model.moe at parallel.tensor=2 needs sequence parallelism"),
    (["model.moe.num_experts=4", "parallel.tensor=2", "attention=gla"], "sequence parallelism needs attention=mha"),
    (["parallel.tensor=2", "parallel.sequence=true", "attention=mla"], "sequence parallelism needs attention=mha"),
    (["parallel.tensor=2", "parallel.sequence=true", "data.seq_len=63"], "splits data.seq_len=63 over"),
    (["parallel.tensor=2", "parallel.sequence=true", "logging.downstream.tasks=[hellaswag]"],
     "logging.downstream needs parallel.sequence=false"),
    (["trainer.precision=fp8"], "trainer.precision='fp8' is unknown; choose one of auto, fp32, bf16"),
    (["model.num_layers=3", "model.moe.num_experts=4", "model.moe.layers=[1,0]"],
     "model.moe.layers has 2 entries for model.num_layers=3; give one 0/1 per layer"),
    (["model.moe.num_experts=4", "model.moe.layers=[1,2,1,1]"], "must hold one 0 (dense) or 1 (MoE) per layer"),
    (["model.moe.num_experts=4", "model.moe.shared_expert_gate=true"], "shared_expert_gate needs model.moe.shared_exp"),
    (["model.moe.num_experts=4", "model.moe.top_k=1"], "model.moe.top_k=1 needs model.moe.norm_topk=false"),
    (["model.moe.num_experts=4", "model.moe.ortho_loss=0.5", "parallel.expert=2"],
     "model.moe.ortho_loss needs parallel.expert=1 and parallel.tensor=1 (not 2 and 1)"),
    (["model.moe.num_experts=4", "model.moe.ortho_loss=0.5", "parallel.tensor=2"],
     "model.moe.ortho_loss needs parallel.expert=1 and parallel.tensor=1 (not 1 and 2)"),
    (["attention=gta", "attention.qkv_bias=true"], "attention.qkv_bias needs megatron's fused linear_qkv"),
    *BAD_VALUES,
])
def test_config_errors_are_one_clear_line(overrides, message):
    with pytest.raises(ValueError) as err:
        compose_config(overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_sequence_parallelism_is_on_where_an_moe_needs_it_unless_set():
    """Off at TP=1 whatever is asked (nothing to split); at TP>1 on for an MoE and off for a dense model,
    unless parallel.sequence says otherwise."""
    def sp(*overrides):
        cfg = compose_config(list(overrides))
        return cfg.parallel.sequence_parallel(cfg.model)

    moe = "model.moe.num_experts=4"
    assert not sp(moe) and not sp("parallel.sequence=true")
    assert sp(moe, "parallel.tensor=2") and not sp("parallel.tensor=2")
    assert sp("parallel.tensor=2", "parallel.sequence=true")


def test_dataclass_validation_directly():
    with pytest.raises(ValueError, match="num_layers"):
        ModelConfig(num_layers=0)
    with pytest.raises(ValueError, match="parallel.tensor"):
        ParallelConfig(tensor=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        ScheduleConfig(warmup_steps=-1)
    with pytest.raises(ValueError, match="checkpoint.interval"):
        CheckpointConfig(interval=0)
    with pytest.raises(ValueError, match="precision"):
        TrainerConfig(precision="fp8")
    with pytest.raises(ValueError, match="optim.name"):
        OptimConfig(name="lion")


def test_world_size_must_be_divisible():
    from pretrain.distributed import check_world

    assert check_world(ParallelConfig(tensor=2, pipeline=1), 4) == 2
    with pytest.raises(ValueError, match="world size 3 is not divisible"):
        check_world(ParallelConfig(tensor=2), 3)


def test_a_single_run_leaves_hydra_nothing_to_write():
    """Hydra's run folder is the working directory and it keeps no files of its own there, so keel's
    run_dir is the only place a run writes (and a bad run_dir is keel's one-line error)."""
    from omegaconf import OmegaConf

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=demo"], return_hydra_config=True)
    assert OmegaConf.select(cfg, "hydra.run.dir") == "."
    assert "FileHandler" not in str(OmegaConf.to_container(cfg.hydra.job_logging))


def test_a_checkpoint_from_before_the_default_final_norm_names_the_override(tmp_path):
    from pretrain.checkpoint import check_compatible
    from pretrain.run import model_signature

    old = {k: v for k, v in model_signature(compose_config(["model.final_norm=false"]), 256).items()}
    assert "final_norm" not in old  # signatures without a final norm never named it
    with pytest.raises(ValueError, match=r"incompatible model \(final_norm None vs True\) .*add model.final_norm=false"):
        check_compatible({"model": old, "megatron_core": "0.19.2"}, model_signature(compose_config([]), 256), tmp_path)
    check_compatible({"model": old, "megatron_core": "0.19.2"},
                     model_signature(compose_config(["model.final_norm=false"]), 256), tmp_path)


@pytest.mark.parametrize("attention,changed", [("gta", "attention.rope_dim=8"), ("gla", "attention.latent_dim=48"),
                                               ("gla", "attention.num_latent_heads=4"), ("mla", "attention.kv_lora_rank=96")])
def test_checkpoint_signature_holds_the_attention_shape(tmp_path, attention, changed):
    import json

    from pretrain.checkpoint import check_compatible
    from pretrain.run import model_signature

    saved = json.loads(json.dumps(model_signature(compose_config([f"attention={attention}"]), 256)))  # as in meta.json
    check_compatible({"model": saved, "megatron_core": "0.19.2"},
                     model_signature(compose_config([f"attention={attention}"]), 256), tmp_path)
    other = model_signature(compose_config([f"attention={attention}", changed]), 256)
    with pytest.raises(ValueError, match="incompatible model.*attention_shape"):
        check_compatible({"model": saved, "megatron_core": "0.19.2"}, other, tmp_path)


def test_checkpoint_signature_holds_qk_norm(tmp_path):
    from pretrain.checkpoint import check_compatible
    from pretrain.run import model_signature

    plain = model_signature(compose_config(["attention=mla"]), 256)
    assert "qk_norm" not in plain  # signatures from before the option still match
    with pytest.raises(ValueError, match=r"incompatible model \(qk_norm None vs True\)"):
        check_compatible({"model": plain, "megatron_core": "0.19.2"},
                         model_signature(compose_config(["attention=mla", "attention.qk_norm=true"]), 256), tmp_path)
