"""The one megatron-core release keel is written for, how keel imports it, and the check every user of
its internals makes.

keel's CPU redirects, its MoE layer, its optimizer patches and its checkpoint plumbing all read
megatron-core's private names, which change between releases. Each of those places calls `require`
before touching them, so another release stops with one line saying what to install instead of failing
somewhere inside megatron.

Every keel process imports megatron-core through `import_megatron` (pretrain/cpu_compat.py calls it when it
is imported, which every entry point does first; data/ calls it before reading or writing a packed dataset)."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import warnings

PINNED = "0.19.2"


def import_megatron() -> None:
    """Import megatron-core quietly, with its import-time ``torch.compile`` deferred. Idempotent; cheap once done.

    1. megatron-core's notices about missing apex/TransformerEngine/absl, its deprecations and its rank guesses
       say nothing to a keel user. Each filter is scoped to megatron's modules (or, for the CUDA-runtime line
       of torch's CUDA build on a machine without a GPU, to that one logger), so other libraries' warnings show.
    2. megatron-core decorates its fusion functions with torch.compile as it is imported (megatron.core.jit),
       and torch.compile imports inductor's whole backend at decoration time: about 3.5 s of CPU, a quarter of
       a short run, before any work and for functions a run may never call. `_compile_on_first_call` defers
       that import to the first call; what runs is unchanged."""
    for category in (UserWarning, DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"megatron\.")
    logging.getLogger("torch.utils.cpp_extension").addFilter(_not_the_cuda_runtime_notice)
    logging.getLogger("megatron").setLevel(logging.WARNING)
    with _compile_on_first_call():
        import megatron.core  # noqa: F401


def _not_the_cuda_runtime_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("No CUDA runtime is found")


@contextlib.contextmanager
def _compile_on_first_call():
    """While megatron-core is first imported, ``torch.compile(fn)`` of a plain function returns a function that
    compiles `fn` at its first call, as torch.compile itself does; only the backend's import waits. Inside a
    compiled region (keel's per-block compile) dynamo sees ``is_compiling()`` and traces `fn` inline, as it
    traces a torch.compile'd function. Anything else goes to torch.compile at once. Restored on exit: the
    functions megatron decorated keep their deferral, nothing else sees it."""
    import torch

    compile_now = torch.compile

    def compile_later(fn=None, **options):
        if fn is None:  # the @torch.compile(...) form
            return functools.partial(compile_later, **options)
        if not inspect.isfunction(fn):
            return compile_now(fn, **options)
        compiled = None

        @functools.wraps(fn)
        def call(*args, **kwargs):
            nonlocal compiled
            if torch.compiler.is_compiling():
                return fn(*args, **kwargs)
            if compiled is None:
                compiled = compile_now(fn, **options)
            return compiled(*args, **kwargs)

        return call

    torch.compile = compile_later
    try:
        yield
    finally:
        torch.compile = compile_now


def installed() -> str:
    """megatron-core's release, without the `+<git sha>` it appends when installed inside a git checkout."""
    import_megatron()
    import megatron.core

    return megatron.core.__version__.split("+")[0]


def require(user: str, what: str, error: type[Exception]) -> None:
    """Raise `error` in one line when the installed release is not `PINNED`; `user` (a module name) uses
    megatron-core's `what`."""
    if (found := installed()) != PINNED:
        raise error(f"{user} uses megatron-core {PINNED}'s {what}, and megatron-core {found} is installed; "
                    f"install megatron-core=={PINNED}")
