"""Attention types and the registry that lists them.

Each type owns itself in one module (models/attention/base.py says what a type is): its config fields,
its megatron ModuleSpec (plugged into `TransformerLayerSubmodules.self_attention`, so model code never
branches on the type), its rules, its KV cache and decode step. Adding one is that module, one line
below (or `register` from outside keel) and a YAML in conf/attention/.
"""

from __future__ import annotations

import dataclasses
import typing

from models.attention.base import AttentionConfig, Layout
from models.attention.gla import GLA
from models.attention.gta import GTA
from models.attention.mla import MLA
from models.attention.standard import GQA, MHA, MQA, standard_attention_spec
from models.config import ModelConfig, check

__all__ = ["ATTENTION_TYPES", "AttentionConfig", "Layout", "attention_config", "attention_names", "attention_options",
           "attention_spec", "register", "standard_attention_spec"]

KEEL_TYPES = (MHA, GQA, MQA, GTA, GLA, MLA)  # keel's own, in the order tools and reports list them
ATTENTION_TYPES: dict[str, type[AttentionConfig]] = {}  # every registered type by name: keel's, then any added
COMMON = {f.name for f in dataclasses.fields(AttentionConfig)}  # type and qk_norm: every type's own


def register(cls: type[AttentionConfig]) -> type[AttentionConfig]:
    """Add an attention type (keel's below; a test or a user's package may add its own before composing a
    config). A field it shares with a registered type must mean the same: the same type and default."""
    check(bool(cls.name) and cls.name not in ATTENTION_TYPES or ATTENTION_TYPES.get(cls.name) is cls,
          f"attention type {cls.name!r} is registered already (or has no name)")
    known = attention_options()
    for name, (kind, default) in _options(cls).items():
        if name in known and name not in COMMON:
            check(known[name] == (kind, default), f"attention.{name} of {cls.name} ({kind}, default {default!r}) "
                                                  f"differs from the registered one {known[name]}")
    ATTENTION_TYPES[cls.name] = cls
    return cls


def attention_names() -> list[str]:
    return list(ATTENTION_TYPES)


def _options(cls: type) -> dict[str, tuple[object, object]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f.default) for f in dataclasses.fields(cls)}


def attention_options() -> dict[str, tuple[object, object]]:
    """Every registered type's fields, {name: (annotation, default)}: the `attention` node of the Hydra
    schema, so that every key keeps its name whichever type owns it."""
    union = _options(AttentionConfig)
    for cls in ATTENTION_TYPES.values():
        union |= {k: v for k, v in _options(cls).items() if k not in COMMON}
    return union


def attention_config(values: dict | AttentionConfig | str) -> AttentionConfig:
    """The chosen type's own config from attention.* values (a composed node of every type's fields, a
    saved config, or just a type's name). A field of another type must be unset (at its default): a set
    one is refused in one line naming the type's own options."""
    if isinstance(values, AttentionConfig):
        return values
    values = {"type": values} if isinstance(values, str) else dict(values)
    name = values.get("type", AttentionConfig.type)
    check(name in ATTENTION_TYPES, f"attention.type={name!r} is unknown; choose one of {', '.join(ATTENTION_TYPES)}")
    cls, union = ATTENTION_TYPES[name], attention_options()
    own = cls.options()
    for key, value in values.items():
        check(key in union, f"unknown config key attention.{key}")
        check(key in own or value == union[key][1],
              f"attention.{key}={value!r} is not an option of attention={name} (its options: {', '.join(own)})")
    return cls(**{k: v for k, v in values.items() if k in own})


def attention_spec(attention: AttentionConfig | str, model: ModelConfig | None = None):
    """The ModuleSpec of `attention` (a config, or a type's name with its defaults); keel's own modules
    (GTA, GLA, MLA) need `model` for their sizes."""
    attention = attention_config(attention)
    check(model is not None or isinstance(attention, (MHA, GQA, MQA)),
          f"attention={attention.type} needs the model config (head dimension) to build its spec")
    return attention.spec(model)


for _type in KEEL_TYPES:
    register(_type)
