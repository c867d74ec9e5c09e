"""The run's configuration: the components' own configs (`models/`, `optim/`, `data/`) composed with
the trainer's, checked together, and registered with Hydra.

Hydra composes the YAML groups in `conf/` over `KeelConfig`; `to_config` then rejects keys the schema
does not know (even ones added with `+`), and `OmegaConf.to_object` instantiates the dataclasses, so
every check runs once, before anything heavy starts, and a bad value is one line.
"""

from __future__ import annotations

import difflib
import importlib
import os
from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from typing import Optional, get_type_hints

from data.config import DataConfig
from models.attention import ATTENTION_TYPES, AttentionConfig, attention_config, attention_options
from models.config import (ConfigError, ModelConfig, check, check_choices, check_positive, choice, choices,
                           sequence_parallel)
from optim.config import OptimConfig, ScheduleConfig
from pretrain.callbacks.downstream import DownstreamConfig
from pretrain.callbacks.loss_plot import LossPlotConfig
from pretrain.callbacks.metrics import MetricsConfig
from pretrain.callbacks.profile import ProfileConfig
from pretrain.callbacks.spike import MIGRATED_KEYS, SpikeMonitorConfig
from pretrain.callbacks.stability import StabilityConfig

Precision = choices("Precision", "auto", "fp32", "bf16")  # auto: bf16 on GPU, fp32 on CPU
Backend = choices("Backend", "auto", "gloo", "nccl")  # auto: nccl with CUDA, else gloo


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    expert: int = 1
    backend: str = choice(Backend, "auto")
    # reduce gradient buckets during the backward (megatron DDP); None: on with a GPU and DP > 1
    overlap_grad_reduce: Optional[bool] = None
    # megatron's sequence parallelism at TP>1 (Megatron-LM's --sequence-parallel; off at TP=1); None: on for
    # an MoE, which megatron trains at TP>1 only with it, off for a dense model
    sequence: Optional[bool] = None

    def __post_init__(self):
        check_choices("parallel", self)
        for name in ("tensor", "pipeline", "expert"):
            check(getattr(self, name) >= 1, f"parallel.{name} must be >= 1, got {getattr(self, name)}")

    def sequence_parallel(self, model: ModelConfig) -> bool:
        return sequence_parallel(self.sequence, model.moe, self.tensor)


@dataclass
class TrainerConfig:
    max_steps: int = 100
    stop_at: Optional[int] = None  # stop after this step with a checkpoint, as an interrupted job would
    global_batch_size: int = 8
    micro_batch_size: int = 4
    eval_interval: int = 50
    eval_batches: int = 4
    # validate once before the first step (a step-0 row in metrics.jsonl): the starting loss on every validation
    # set; None: when the run starts from init_from (continual pretraining), not from scratch
    eval_at_start: Optional[bool] = None
    log_interval: int = 10  # logged steps (and validations, checkpoints) are the only ones the host waits on
    max_skipped_steps: int = 5  # stop after this many non-finite steps in a row
    precision: str = choice(Precision, "auto")
    progress: bool = True  # the progress bar (pretrain/callbacks/progress.py)
    threads: Optional[int] = None  # torch intra-op threads on CPU; None: torch's default
    # torch.compile each transformer layer (models/compile.py). None: on with a GPU, off on CPU, where
    # inductor's compile (about 35 s for the smoke model on 2 cores) outlasts a whole smoke run
    compile: Optional[bool] = None
    profile: ProfileConfig = field(default_factory=ProfileConfig)  # a window of steps traced (callbacks/profile.py)

    def compile_on(self, device) -> bool:
        return self.compile if self.compile is not None else device.type == "cuda"

    def __post_init__(self):
        check_choices("trainer", self)
        check_positive("trainer", self, "max_steps", "global_batch_size", "micro_batch_size", "eval_interval",
                       "eval_batches", "log_interval", "max_skipped_steps", "threads")
        check(self.stop_at is None or 1 <= self.stop_at <= self.max_steps,
              f"trainer.stop_at={self.stop_at} must be in [1, trainer.max_steps={self.max_steps}]")
        check(self.global_batch_size % self.micro_batch_size == 0,
              f"trainer.global_batch_size={self.global_batch_size} must be a multiple of "
              f"trainer.micro_batch_size={self.micro_batch_size}")


@dataclass
class CheckpointConfig:
    interval: int = 100
    keep_last: int = 2
    async_save: bool = False  # write in the background, publish when done (pretrain/checkpoint/async_save.py)

    def __post_init__(self):
        check_positive("checkpoint", self, "interval", "keep_last")


@dataclass
class MonitorConfig(SpikeMonitorConfig, StabilityConfig):
    """`logging.monitors`: one node for the keys of two callbacks, the stability monitors' (interval,
    batch_rows) and the spike section (`spike`), each defined and checked beside its callback."""

    def __post_init__(self):
        StabilityConfig.__post_init__(self)


@dataclass
class LoggingConfig(LossPlotConfig, MetricsConfig):
    """`logging`: the callbacks' keys (tensorboard, wandb, plot, monitors, downstream), each defined beside its
    callback."""

    monitors: MonitorConfig = field(default_factory=MonitorConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)


@dataclass
class KeelConfig:
    name: str = "default"
    run_dir: Optional[str] = None  # None: runs/<name> (in a -m sweep, one folder per run)
    seed: int = 1234
    init_from: Optional[str] = None  # continual pretraining: weights only, from a checkpoint folder
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=lambda: attention_config("gqa"))
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lr: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        """What spans components: sequence lengths, the parallel layout against the model, and options
        that only some attention types or layouts support."""
        if not isinstance(self.attention, AttentionConfig):  # the schema's node of every type's fields
            self.attention = attention_config(vars(self.attention))
        model, attention, parallel = self.model, self.attention, self.parallel
        check(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        check(self.data.seq_len <= model.max_seq_len,
              f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={model.max_seq_len}; "
              "shorten the sequence or raise the model's maximum")
        check(model.heads % parallel.tensor == 0,
              f"parallel.tensor={parallel.tensor} does not divide the {model.heads} attention heads; "
              "pick a tensor-parallel size that divides model.num_heads")
        check(model.num_layers % parallel.pipeline == 0,
              f"parallel.pipeline={parallel.pipeline} does not divide model.num_layers={model.num_layers}")
        attention.check(model, parallel.tensor)
        fused = [name for name, kind in ATTENTION_TYPES.items() if kind.fused_qkv]
        check(not self.optim.quack or attention.fused_qkv,
              f"optim.quack needs attention={', '.join(fused[:-1])} or {fused[-1]} (megatron's fused linear_qkv), "
              f"not {attention.type}")
        # megatron's MoELayer trains at TP>1 only with sequence parallelism, which splits the sequence over TP
        check(not (model.moe.num_experts and parallel.tensor > 1 and not parallel.sequence_parallel(model)),
              f"model.moe at parallel.tensor={parallel.tensor} needs sequence parallelism (megatron's MoE layer); "
              "set parallel.sequence=true or leave it unset")
        if parallel.sequence_parallel(model):
            attention.check_sequence_parallel()
            check(self.data.seq_len % parallel.tensor == 0,
                  f"sequence parallelism splits data.seq_len={self.data.seq_len} over parallel.tensor="
                  f"{parallel.tensor} ranks; pick a multiple of {parallel.tensor}")
            check(not self.logging.downstream.tasks, "logging.downstream needs parallel.sequence=false (its "
                  "requests and decode steps have any length); score the checkpoints with tools/evaluate.py --tasks")
        check(not model.moe.num_experts or model.moe.num_experts % parallel.expert == 0,
              f"parallel.expert={parallel.expert} must divide model.moe.num_experts={model.moe.num_experts}")
        # L_o compares each token's selected experts' outputs, so they must all be computed on one rank
        check(not (model.moe.num_experts and model.moe.ortho_loss) or parallel.expert == parallel.tensor == 1,
              f"model.moe.ortho_loss needs parallel.expert=1 and parallel.tensor=1 (not {parallel.expert} and "
              f"{parallel.tensor}): each token's selected experts must be on one rank; drop ortho_loss or the split")


PLUGINS = "KEEL_PLUGINS"  # modules to import first, comma-separated: what they register (attention types, callbacks)


def import_plugins() -> None:
    """Import the modules KEEL_PLUGINS names (once each; Python caches them), so that what they register
    (in models/attention, pretrain/callbacks) is part of every config keel composes or reads and of every
    run, in training and in every tool."""
    for name in filter(None, (n.strip() for n in os.environ.get(PLUGINS, "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"{PLUGINS} names {name!r}, which cannot be imported ({e}); "
                              "put it on PYTHONPATH") from None


def schema() -> type[KeelConfig]:
    """KeelConfig as Hydra sees it: its `attention` node holds every registered attention type's fields
    (models/attention), so each key keeps its name whichever type owns it; KeelConfig then keeps the
    chosen type's own config. Built when a config is composed or read, after KEEL_PLUGINS's imports."""
    import_plugins()
    options = [(name, kind, field(default=default)) for name, (kind, default) in attention_options().items()]
    node = make_dataclass("AttentionOptions", options)
    return make_dataclass("KeelSchema", [("attention", node, field(default_factory=node))], bases=(KeelConfig,))


def register_configs() -> type[KeelConfig]:
    """Make the schema available to Hydra as `keel_schema` (conf/config.yaml extends it)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    keel_schema = schema()
    ConfigStore.instance().store(name="keel_schema", node=keel_schema)
    # Hydra records its composed config (.hydra/) in each multirun job's folder, which is that job's
    # run folder; a single run writes nothing of Hydra's (conf/config.yaml sets hydra.run.dir to .)
    if not OmegaConf.has_resolver("keel_hydra_subdir"):
        OmegaConf.register_new_resolver("keel_hydra_subdir", lambda mode: ".hydra" if "MULTIRUN" in str(mode) else None)
    return keel_schema


def compose_config(overrides: list[str]) -> KeelConfig:
    """A validated KeelConfig from keel's Hydra groups (conf/) plus command-line style overrides."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    for override in overrides:  # a key the spike section replaced: the new name, before Hydra's own error
        key = override.lstrip("+~").split("=", 1)[0]
        old = key.removeprefix("logging.monitors.")
        if key != old and old in MIGRATED_KEYS:
            raise ConfigError(f"{key} is now logging.monitors.{MIGRATED_KEYS[old]} (the spike section); rename it")
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        try:
            raw = compose("config", overrides=overrides)
        except (HydraException, OmegaConfBaseException) as e:  # a malformed or impossible override
            raise ConfigError(_first_lines(e)) from None
        return to_config(raw, overrides)


def _first_lines(error: Exception) -> str:
    """Hydra's error and the cause it wraps, each cut to its first line, as one line."""
    lines = [str(e).strip().splitlines()[0] for e in (error, error.__cause__) if e is not None and str(e).strip()]
    if getattr(error, "override", None):  # a parse error does not name the override it failed on
        lines.insert(0, f"cannot parse the override {error.override!r}")
    return ": ".join(dict.fromkeys(lines)) or type(error).__name__


def config_from_dict(values: dict) -> KeelConfig:
    """A saved, resolved config (run_info.json's "config") as a validated KeelConfig."""
    from omegaconf import OmegaConf

    return to_config(OmegaConf.merge(OmegaConf.structured(schema()), migrate_saved(values)))


def migrate_saved(values: dict) -> dict:
    """A config saved before `logging.monitors.spike` (spike_window, spike_z, spike_action) in today's keys,
    so that run folders written before it still resume and their tools still read them."""
    monitors = values.get("logging", {}).get("monitors", {})
    if not any(k in monitors for k in MIGRATED_KEYS):
        return values
    old = {k: monitors[k] for k in MIGRATED_KEYS if k in monitors}
    spike = {MIGRATED_KEYS[k].split(".")[1]: v for k, v in old.items()}
    spike["min_count"] = min(spike.get("window", 128), 20)
    monitors = {k: v for k, v in monitors.items() if k not in MIGRATED_KEYS} | {"spike": spike}
    return values | {"logging": values["logging"] | {"monitors": monitors}}


def command_line_overrides() -> list[str]:
    """The overrides this Hydra job was given (a multirun job's own included); [] outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


ADOPTED = ("model", "attention", "data.tokenizer")  # what init_from brings along from the run it points at


def adopt_init_from(raw, overrides: list[str]) -> None:
    """init_from=X takes the model, the attention and the tokenizer of X's run (its run_info.json, which
    tools/import_hf.py also writes), so a continual run need not retype them; a key named in
    `overrides` (the command line) keeps its value, and so does data.tokenizer when X's was unset (the
    cached stdlib tokenizer). Without a run_info.json above X nothing changes."""
    from functools import reduce
    from pathlib import Path

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from pretrain.rundir import find_run_folder, read_run_info

    source = find_run_folder(Path(raw.init_from)) if raw.get("init_from") else None
    if source is None:
        return
    saved = read_run_info(source)["config"]
    named = [o.lstrip("+~").split("=", 1)[0] for o in overrides]
    for section in ADOPTED:
        value = reduce(lambda node, part: node.get(part) if isinstance(node, dict) else None, section.split("."), saved)
        for key, value in _leaves(value, section) if isinstance(value, dict) else [(section, value)]:
            if any(key == n or key.startswith(f"{n}.") for n in named) or (section == "data.tokenizer" and value is None):
                continue
            try:
                OmegaConf.update(raw, key, value, merge=False)
            except OmegaConfBaseException:
                continue  # a key this keel no longer has: the composed value stays


def _leaves(values: dict, prefix: str):
    """(dotted key, value) of every leaf of a nested dict."""
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}.{key}")
        else:
            yield f"{prefix}.{key}", value


def to_config(raw, overrides: list[str] | None = None) -> KeelConfig:
    """Resolve a Hydra DictConfig into validated dataclasses; a bad value raises one clear ConfigError.
    With `overrides` (the command line that composed `raw`), init_from's model and tokenizer come first;
    a saved, resolved config passes None."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if overrides is not None:
        adopt_init_from(raw, overrides)
    unknown = unknown_keys(raw, schema())
    if unknown:
        raise ConfigError(unknown[0])
    try:
        composed = OmegaConf.to_object(raw)  # a KeelSchema whose attention is now the chosen type's config
        return KeelConfig(**{f.name: getattr(composed, f.name) for f in fields(KeelConfig)})
    except OmegaConfBaseException as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, ValueError) and not isinstance(cause, OmegaConfBaseException):
            raise ConfigError(str(cause)) from None
        key = getattr(e, "full_key", None)
        first = str(e).splitlines()[0]
        raise ConfigError(f"{key}: {first}" if key else first) from None


def unknown_keys(node, schema: type, prefix: str = "") -> list[str]:
    """One message per key of `node` (a DictConfig) that the dataclass `schema` does not define,
    with the closest known name: Hydra's `+key=value` adds keys past the schema's struct mode."""
    from omegaconf import DictConfig

    types = get_type_hints(schema)
    problems = []
    for key in node.keys():
        if prefix == "logging.monitors." and key in MIGRATED_KEYS:
            problems.append(f"{prefix}{key} is now {prefix}{MIGRATED_KEYS[key]} (the spike section); rename it")
        elif key not in types:
            close = difflib.get_close_matches(str(key), list(types), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            problems.append(f"unknown config key {prefix}{key}{hint}")
        elif is_dataclass(types[key]) and isinstance(node[key], DictConfig):
            problems += unknown_keys(node[key], types[key], f"{prefix}{key}.")
    return problems
