"""The setup of the helper processes the trainer starts (the Manager serving megatron's background checkpoint-writer
results). A spawned process imports this module, and the entry point as `__mp_main__`, before it runs: both
stay free of torch and megatron, so a helper starts in a fraction of a second instead of re-importing them."""

from __future__ import annotations

import ctypes
import signal


def setup() -> None:
    """Ignore SIGTERM and SIGINT: a scheduler signals every process of the job (systemd the process group,
    torchrun each worker's group) and the trainer, which also gets the signal, still needs its helper to
    finish the checkpoint. And, on Linux, the kernel kills the helper when its parent dies (prctl
    PR_SET_PDEATHSIG), so a `kill -9` of the trainer leaves nothing behind."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the helper outlives a killed parent
        pass
