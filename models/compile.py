"""torch.compile of megatron-core's transformer layers, one compiled forward per layer (torchtitan's
recipe), with an eager fallback.

Why per layer and not the whole model: megatron's GPTModel wraps its layers in code dynamo cannot
trace without breaks (the schedule, the DDP hooks, the vocab-parallel loss), while a TransformerLayer is
a pure function of its inputs and parameters. Every layer of a homogeneous model shares one graph:
dynamo lifts the parameters into graph inputs, so only the first layer pays for compilation.
"""

from __future__ import annotations

import contextlib
import functools
import sys

import torch

COMPILE_ERROR_MODULES = ("torch._dynamo", "torch._inductor", "torch._functorch", "torch._subclasses")
BACKEND = "inductor"  # torch.compile's default; tests swap in a failing one to exercise the fallback


def _quiet_group_lookup() -> None:
    """megatron-core 0.19.2's RowParallelLinear passes tp_group=None to its matmul, whose group lookup
    (utils.get_tensor_model_parallel_group_if_none) then calls `warnings.warn` on rank 0 at every call.
    Dynamo cannot trace that C builtin, nor move it out of the graph, so each row-parallel linear broke
    the layer's graph (the "function marked as skipped" breaks: 10 in the smoke model, 11 at 755M).
    While dynamo traces, the lookup returns the same group without the warning."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import layers

    original = getattr(layers.get_tensor_model_parallel_group_if_none, "__wrapped__",
                       layers.get_tensor_model_parallel_group_if_none)

    @functools.wraps(original)
    def lookup(tp_group, is_expert=False, check_initialized=True):
        if tp_group is not None or not torch.compiler.is_compiling() or not parallel_state.is_initialized():
            return original(tp_group, is_expert, check_initialized)
        get = (parallel_state.get_expert_tensor_parallel_group if is_expert
               else parallel_state.get_tensor_model_parallel_group)
        return get(check_initialized=check_initialized)

    layers.get_tensor_model_parallel_group_if_none = lookup


def is_compile_error(error: BaseException) -> bool:
    """Whether `error` (or what it wraps) comes from dynamo, AOTAutograd or inductor, not from the model."""
    while error is not None:
        if type(error).__module__.startswith(COMPILE_ERROR_MODULES):
            return True
        error = error.__cause__ or error.__context__
    return False


class CompiledLayers:
    """Compiles each layer's forward in place; `fall_back` puts every layer back to eager, with one warning.

    Compilation happens lazily, at a layer's first call, and its backward at the first backward, so the
    trainer guards whole forward-backward passes and calls `fall_back` on a compile error."""

    def __init__(self, layers, backend: str | object | None = None):
        _quiet_group_lookup()
        self.layers = list(layers)
        self.active = True
        # one entry per layer in dynamo's cache of TransformerLayer.forward: keep them all compiled
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * len(self.layers) + 8)
        for layer in self.layers:
            layer.forward = torch.compile(layer.forward, backend=backend or BACKEND)

    def fall_back(self, error: BaseException) -> None:
        while getattr(error, "inner_exception", None) or error.__cause__:  # name the backend's own error
            error = getattr(error, "inner_exception", None) or error.__cause__
        first = (str(error).strip().splitlines() or [""])[0][:200]
        print(f"keel: warning: torch.compile failed ({type(error).__name__}: {first}); the transformer layers run "
              "eagerly (trainer.compile=false silences this)", file=sys.stderr, flush=True)
        for layer in self.layers:
            del layer.forward  # the class's eager forward again
        self.active = False


@contextlib.contextmanager
def eager():
    """Run compiled code eagerly inside this block (a reference pass, e.g. the stability monitors')."""
    with torch.compiler.set_stance("force_eager"):
        yield
