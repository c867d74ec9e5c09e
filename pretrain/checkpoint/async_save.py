"""Checkpoints written in the background (`checkpoint.async_save`): megatron's async writer, one save in
flight at a time, published (manifest, rename, prune) once every rank's writer is done."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

from pretrain.checkpoint.storage import storage_errors

# megatron's own writer (NVRx is not installed); read-only: the package keeps no state
ASYNC = MappingProxyType({"async_sharded_save": True, "async_strategy": "mcore"})


class AsyncSaver:
    """The save in flight, if any. `poll` runs each step on every rank (finalizing is collective)."""

    def __init__(self):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.queue = AsyncCallsQueue(persistent=False)
        self.in_flight: Path | None = None

    def schedule(self, request, tmp: Path) -> None:
        self.queue.schedule_async_request(request)
        self.in_flight = tmp

    def poll(self, blocking: bool = False) -> None:
        if self.in_flight is None:
            return
        with storage_errors(self.in_flight):
            self.queue.maybe_finalize_async_calls(blocking=blocking)
        if not self.queue.get_num_unfinalized_calls():
            self.in_flight = None

    def wait(self) -> None:
        self.poll(blocking=True)
