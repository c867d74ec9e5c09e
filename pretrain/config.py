"""Structured configs: one small dataclass per component, validated in `__post_init__`.

Hydra composes these from the YAML groups in `conf/`; `OmegaConf.to_object` then instantiates the
dataclasses, so every check below runs once, before anything heavy starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class MoEConfig:
    num_experts: int = 0  # 0: dense MLP everywhere
    top_k: int = 2
    every: int = 1  # every n-th layer is MoE (1: all layers)
    ffn_hidden_size: Optional[int] = None  # per expert; None: the dense FFN size
    aux_loss: str = "switch"  # switch (global) | seq (sequence-level) | none
    aux_loss_coeff: float = 1e-2
    z_loss: float = 0.0
    ortho_loss: float = 0.0  # beta
    var_loss: float = 0.0  # gamma
    capacity_factor: Optional[float] = None  # None: no token dropping
    drop_policy: str = "probs"  # probs | position

    def __post_init__(self):
        _check(self.num_experts >= 0, f"model.moe.num_experts must be >= 0, got {self.num_experts}")
        if self.num_experts:
            _check(1 <= self.top_k <= self.num_experts,
                   f"model.moe.top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
            _check(self.every >= 1, f"model.moe.every must be >= 1, got {self.every}")
            _check(self.aux_loss in ("switch", "seq", "none"), f"model.moe.aux_loss must be switch, seq or none, got {self.aux_loss!r}")
            _check(self.drop_policy in ("probs", "position"), f"model.moe.drop_policy must be probs or position, got {self.drop_policy!r}")


@dataclass
class AttentionConfig:
    """Which attention a layer uses; the spec builder in `models/` maps `type` to a module."""

    type: str = "gqa"  # mha | gqa | mqa | mla | gta | gla
    num_query_groups: Optional[int] = None  # gqa/gta; None: heads // 2
    rope_dim: Optional[int] = None  # gta: RoPE key width, None: head_dim // 2
    num_latent_heads: int = 2  # gla: h_c
    latent_dim: Optional[int] = None  # gla: d_c, None: 2 * head_dim
    q_lora_rank: Optional[int] = None  # mla
    kv_lora_rank: Optional[int] = None  # mla, None: 4 * head_dim
    qk_pos_emb_head_dim: Optional[int] = None  # mla/gla decoupled RoPE width, None: head_dim // 2

    def __post_init__(self):
        _check(self.type in ("mha", "gqa", "mqa", "mla", "gta", "gla"),
               f"attention={self.type!r} is unknown; choose mha, gqa, mqa, mla, gta or gla")

    def shape(self, head_dim: int) -> dict:
        """The sizes this type's weights and KV cache depend on beyond heads/groups, defaults resolved.
        MLA is GLA with one latent of width kv_lora_rank."""
        if self.type == "gta":
            return {"rope_dim": self.rope_dim or head_dim // 2}
        if self.type in ("gla", "mla"):
            gla = self.type == "gla"
            return {"num_latents": self.num_latent_heads if gla else 1,
                    "latent_dim": (self.latent_dim or 2 * head_dim) if gla else (self.kv_lora_rank or 4 * head_dim),
                    "rope_dim": self.qk_pos_emb_head_dim or head_dim // 2, "q_lora_rank": self.q_lora_rank}
        return {}


@dataclass
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 128
    head_dim: int = 32  # fixed under width scaling: heads = hidden_size // head_dim
    num_heads: Optional[int] = None  # None: derived from hidden_size and head_dim
    ffn_hidden_size: Optional[int] = None  # None: derived from hidden_size (8/3 h for SwiGLU, 4 h otherwise)
    max_seq_len: int = 2048
    position_embedding: str = "rope"  # rope | learned_absolute
    rotary_base: int = 10000
    normalization: str = "RMSNorm"  # RMSNorm | LayerNorm
    activation: str = "swiglu"  # swiglu | gelu
    tie_embeddings: bool = True
    init_std: float = 0.02
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self):
        # validation only: derived sizes are properties, so a default instance never freezes them
        _check(self.num_layers >= 1, f"model.num_layers must be >= 1, got {self.num_layers}")
        if self.num_heads is None:
            _check(self.hidden_size % self.head_dim == 0,
                   f"model.hidden_size={self.hidden_size} is not divisible by model.head_dim={self.head_dim}; "
                   "choose a multiple of the head dimension")
        _check(self.heads >= 1 and self.hidden_size % self.heads == 0,
               f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.heads}")
        _check(self.position_embedding in ("rope", "learned_absolute"),
               f"model.position_embedding must be rope or learned_absolute, got {self.position_embedding!r}")
        _check(self.normalization in ("RMSNorm", "LayerNorm"),
               f"model.normalization must be RMSNorm or LayerNorm, got {self.normalization!r}")
        _check(self.activation in ("swiglu", "gelu"), f"model.activation must be swiglu or gelu, got {self.activation!r}")

    @property
    def heads(self) -> int:
        return self.num_heads if self.num_heads is not None else self.hidden_size // self.head_dim

    @property
    def kv_channels(self) -> int:
        """Per-head width actually used (equals head_dim unless num_heads is set explicitly)."""
        return self.hidden_size // self.heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        return _round_up(8 * self.hidden_size // 3, 8) if self.activation == "swiglu" else 4 * self.hidden_size


def _round_up(x: int, m: int) -> int:
    return int(math.ceil(x / m) * m)


@dataclass
class DataConfig:
    """Packed datasets. With `path` unset, the named corpus is tokenized and packed into the cache."""

    corpus: str = "stdlib"  # stdlib | stdlib:code | stdlib:tests
    path: Optional[str] = None  # prefix of a packed training set (tools/pack.py --output)
    val_path: Optional[str] = None  # prefix of a packed validation set
    tokenizer: Optional[str] = None  # sentencepiece model; None: train one on the stdlib and cache it
    vocab_size: int = 8192  # for the auto-trained tokenizer
    seq_len: int = 256
    pack_method: str = "concat"  # sp | bfd | concat | pad, for auto-packed corpora
    val_percent: float = 5.0
    reset_position_ids: bool = False  # restart positions at each document
    document_mask: bool = False  # attend only within the current document
    cache_dir: Optional[str] = None  # None: $KEEL_CACHE or ~/.cache/keel

    def __post_init__(self):
        _check(self.seq_len >= 2, f"data.seq_len must be >= 2, got {self.seq_len}")
        _check(self.pack_method in ("sp", "bfd", "concat", "pad"),
               f"data.pack_method must be sp, bfd, concat or pad, got {self.pack_method!r}")
        _check(0 < self.val_percent < 50, f"data.val_percent must be in (0, 50), got {self.val_percent}")
        _check(self.path is not None or self.corpus in ("stdlib", "stdlib:code", "stdlib:tests"),
               f"data.corpus={self.corpus!r} is not a named corpus; pack it with tools/pack.py and set data.path")


@dataclass
class SpectralConfig:
    enabled: bool = False
    tau: float = 0.05  # chosen by the ablation in docs/results/warmup_free.md
    power_iters: int = 3
    bound_embeddings: bool = False


LAYERWISE_PRESETS = ("max_stable", "everett_adam")  # exponent tables in optim/lr_rules.py


@dataclass
class LayerwiseConfig:
    """Per-group width exponents of `optim.lr_rule=layerwise`: eta_g = lr * (n / n0)^-alpha_g."""

    preset: str = "max_stable"  # max_stable (Haas et al. 2025) | everett_adam (Everett et al. 2024)
    embedding: Optional[float] = None  # None: the preset's exponent
    hidden: Optional[float] = None
    readout: Optional[float] = None
    norm: Optional[float] = None

    def __post_init__(self):
        _check(self.preset in LAYERWISE_PRESETS,
               f"optim.layerwise.preset must be one of {', '.join(LAYERWISE_PRESETS)}, got {self.preset!r}")


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    momentum: float = 0.9  # sgd
    grad_clip: float = 1.0  # 0 disables
    distributed: bool = False  # megatron's distributed optimizer (ZeRO-1 style sharding over DP)
    lr_rule: str = "global"  # global | sp_width | layerwise
    base_width: int = 128  # n0 of the width rules
    width_exponent: Optional[float] = None  # alpha; None: the paper's value for the optimizer
    layerwise: LayerwiseConfig = field(default_factory=LayerwiseConfig)
    spectral: SpectralConfig = field(default_factory=SpectralConfig)
    quack: bool = False  # per-head query/key learning rates ∝ 1/‖W_K‖, 1/‖W_Q‖ (optim/quack.py)

    def __post_init__(self):
        _check(self.name in ("adamw", "sgd"), f"optim.name must be adamw or sgd, got {self.name!r}")
        _check(self.lr > 0, f"optim.lr must be positive, got {self.lr}")
        _check(self.grad_clip >= 0, f"optim.grad_clip must be >= 0, got {self.grad_clip}")
        _check(not (self.distributed and self.name != "adamw"),
               "optim.distributed=true needs optim.name=adamw (megatron's distributed optimizer is Adam-only)")
        _check(self.lr_rule in ("global", "sp_width", "layerwise"),
               f"optim.lr_rule must be global, sp_width or layerwise, got {self.lr_rule!r}")
        _check(self.base_width >= 1, f"optim.base_width must be >= 1, got {self.base_width}")
        _check(not (self.quack and self.spectral.enabled),
               "optim.quack and optim.spectral.enabled are alternatives; enable one of them")


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # constant | cosine | wsd
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # final LR as a fraction of the peak
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying

    def __post_init__(self):
        _check(self.name in ("constant", "cosine", "wsd"), f"lr.name must be constant, cosine or wsd, got {self.name!r}")
        _check(self.warmup_steps >= 0, f"lr.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(0 <= self.min_lr_ratio <= 1, f"lr.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(0 < self.decay_fraction <= 1, f"lr.decay_fraction must be in (0, 1], got {self.decay_fraction}")


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    expert: int = 1
    backend: str = "auto"  # auto (nccl with CUDA, else gloo) | gloo | nccl

    def __post_init__(self):
        for name in ("tensor", "pipeline", "expert"):
            _check(getattr(self, name) >= 1, f"parallel.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class TrainerConfig:
    max_steps: int = 100
    stop_at: Optional[int] = None  # stop after this step with a checkpoint, as an interrupted job would
    global_batch_size: int = 8
    micro_batch_size: int = 4
    eval_interval: int = 50
    eval_batches: int = 4
    log_interval: int = 1
    max_skipped_steps: int = 5  # stop after this many non-finite steps in a row
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    progress: bool = True
    threads: Optional[int] = None  # torch intra-op threads on CPU; None: torch's default

    def __post_init__(self):
        _check(self.max_steps >= 1, f"trainer.max_steps must be >= 1, got {self.max_steps}")
        _check(self.stop_at is None or 1 <= self.stop_at <= self.max_steps,
               f"trainer.stop_at={self.stop_at} must be in [1, trainer.max_steps={self.max_steps}]")
        _check(self.micro_batch_size >= 1 and self.global_batch_size % self.micro_batch_size == 0,
               f"trainer.global_batch_size={self.global_batch_size} must be a multiple of "
               f"trainer.micro_batch_size={self.micro_batch_size}")
        _check(self.eval_interval >= 1, f"trainer.eval_interval must be >= 1, got {self.eval_interval}")
        _check(self.precision in ("auto", "fp32", "bf16"), f"trainer.precision must be auto, fp32 or bf16, got {self.precision!r}")


@dataclass
class CheckpointConfig:
    interval: int = 100
    keep_last: int = 2

    def __post_init__(self):
        _check(self.interval >= 1, f"checkpoint.interval must be >= 1, got {self.interval}")
        _check(self.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {self.keep_last}")


@dataclass
class MonitorConfig:
    interval: int = 50  # stability monitors every n steps; 0 disables
    batch_rows: int = 1  # rows of the batch the monitors look at
    spike_window: int = 50
    spike_z: float = 6.0
    spike_action: str = "log"  # log | skip | stop

    def __post_init__(self):
        _check(self.spike_action in ("log", "skip", "stop"),
               f"logging.monitors.spike_action must be log, skip or stop, got {self.spike_action!r}")


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    plot: bool = True
    monitors: MonitorConfig = field(default_factory=MonitorConfig)


@dataclass
class KeelConfig:
    name: str = "default"
    run_dir: Optional[str] = None  # None: runs/<name> (in a -m sweep, one folder per run)
    seed: int = 1234
    init_from: Optional[str] = None  # continual pretraining: weights only, from a checkpoint folder
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lr: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        _check(self.data.seq_len <= self.model.max_seq_len,
               f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}; "
               "shorten the sequence or raise the model's maximum")
        heads = self.model.heads
        _check(heads % self.parallel.tensor == 0,
               f"parallel.tensor={self.parallel.tensor} does not divide the {heads} attention heads; "
               "pick a tensor-parallel size that divides model.num_heads")
        _check(self.model.num_layers % self.parallel.pipeline == 0,
               f"parallel.pipeline={self.parallel.pipeline} does not divide model.num_layers={self.model.num_layers}")
        groups = self.attention.num_query_groups or self.num_query_groups()
        _check(groups >= 1 and heads % groups == 0,
               f"attention.num_query_groups={groups} must divide the {heads} heads")
        _check(groups % self.parallel.tensor == 0 or self.attention.type in ("mla", "gla", "mqa"),
               f"parallel.tensor={self.parallel.tensor} does not divide the {groups} key/value heads; "
               "pick a tensor-parallel size that divides attention.num_query_groups")
        _check(not self.optim.quack or self.attention.type in ("mha", "gqa", "mqa"),
               f"optim.quack needs attention=mha, gqa or mqa (megatron's fused linear_qkv), not {self.attention.type}")

    def num_query_groups(self) -> int:
        a = self.attention
        if a.type in ("mha",):
            return self.model.heads
        if a.type == "mqa":
            return 1
        if a.num_query_groups is not None:
            return a.num_query_groups
        return max(1, self.model.heads // 2)


def register_configs() -> None:
    """Make the schema available to Hydra as `keel_schema` (conf/config.yaml extends it)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name="keel_schema", node=KeelConfig)
    # Hydra's own output folder follows run_dir, or runs/<name> when run_dir is unset
    if not OmegaConf.has_resolver("keel_run_dir"):
        OmegaConf.register_new_resolver("keel_run_dir", lambda run_dir, name: run_dir or f"runs/{name}")


def compose_config(overrides: list[str]) -> KeelConfig:
    """A validated KeelConfig from keel's Hydra groups (conf/) plus command-line style overrides."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    register_configs()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return to_config(compose("config", overrides=overrides))


def config_from_dict(values: dict) -> KeelConfig:
    """A saved, resolved config (run_info.json's "config") as a validated KeelConfig."""
    from omegaconf import OmegaConf

    return to_config(OmegaConf.merge(OmegaConf.structured(KeelConfig), values))


def to_config(raw) -> KeelConfig:
    """Resolve a Hydra DictConfig into validated dataclasses; a bad value raises one clear ValueError."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_object(raw)
    except OmegaConfBaseException as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, ValueError):
            raise ValueError(str(cause)) from None
        raise ValueError(str(e).splitlines()[0]) from None
