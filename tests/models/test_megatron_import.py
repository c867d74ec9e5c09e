"""How keel imports megatron-core (models/megatron_release.py): torch.compile's backend is not imported until a
function megatron decorated with it is first called, and that function then runs compiled, or inline in a
compiled region, as before."""

import subprocess
import sys

import torch

from models.megatron_release import _compile_on_first_call
from tests.helpers import ROOT, child_env


def test_a_fresh_process_imports_megatron_without_inductor():
    code = ("import sys\nfrom pretrain import cpu_compat\n"
            "from megatron.core.fusions import fused_bias_swiglu\n"
            "print('megatron.core' in sys.modules, 'torch._inductor.compile_fx' in sys.modules,"
            " hasattr(fused_bias_swiglu.swiglu, '__wrapped__'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["True", "False", "True"]  # imported; no backend yet; swiglu deferred


def test_a_deferred_function_compiles_at_its_first_call_and_traces_inline():
    calls = []

    def swish(x):
        calls.append(torch.compiler.is_compiling())
        return x * torch.sigmoid(x)

    with _compile_on_first_call():
        deferred = torch.compile(swish, backend="eager")
        deferred_too = torch.compile(backend="eager")(swish)  # the @torch.compile(...) form
        layer = torch.compile(torch.nn.Linear(4, 4), backend="eager")  # a module: compiled as before
    assert torch.compile.__module__ == "torch"  # restored on exit
    assert isinstance(layer, torch._dynamo.eval_frame.OptimizedModule)

    x = torch.randn(3, 4)
    assert torch.equal(deferred(x), swish(x)) and torch.equal(deferred_too(x), swish(x))
    assert calls[0] is True  # the first call of `deferred` ran under dynamo: it was compiled then

    calls.clear()
    # in a compiled region with no graph break allowed, the deferred function is traced inline
    outer = torch.compile(lambda t: deferred(t) + 1, backend="eager", fullgraph=True)
    assert torch.equal(outer(x), swish(x) + 1) and calls[0] is True
