"""Everything keel's checkpointing does with megatron-core's private API, in one place, for the one
release it was read from (`models.megatron_release.PINNED`): each function first checks the installed release, so another
one stops with a line saying what to install instead of failing somewhere inside megatron.

1. `use_results_queue`: megatron's checkpoint writer sends its results through the queue in
   `filesystem_async._results_queue`, which `get_write_results_queue` fills on first use with a
   multiprocessing Manager's. A synchronous save writes in this process (threads only), so keel puts a plain
   `queue.Queue` there: no helper process, and no 2-second stall on the first save while a Manager unpickles
   torch's WriteResult (importing torch). A background save writes from a forked process, which needs a
   Manager; started by megatron, that Manager dies of the SIGTERM that preempts the job (losing the
   checkpoint) and outlives a `kill -9` of the trainer, so keel starts it itself, as a helper process that
   ignores both signals and dies with its parent (`pretrain.helper_process`, which imports neither torch nor
   megatron, so the helper starts fast).
2. `quiet_sync_save_notice`: megatron's synchronous torch_dist save runs through its own async writer and
   then warns (once per process) that this writer is deprecated; keel saves synchronously, so the notice
   says nothing to a user and is dropped while a save runs.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

from models import megatron_release
from pretrain.checkpoint.errors import CheckpointError

_SAVE_LOGGER = "megatron.core.dist_checkpointing.strategies.torch"
_SYNC_SAVE_NOTICE = "MCore's async save is deprecated"


def require_release() -> None:
    """One line when the installed megatron-core is not the release this module was written for."""
    megatron_release.require(__name__, "private checkpoint API", CheckpointError)


def use_results_queue(background: bool) -> None:
    """megatron's writer results queue (once per process and kind: the slot keeps it): in this process for a
    synchronous save; for a background one, served by a helper process keel starts and
    `pretrain.helper_process` sets up."""
    import queue
    from multiprocessing import get_context
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from pretrain import helper_process

    require_release()
    current = filesystem_async._results_queue
    if background and (current is None or isinstance(current, queue.Queue)):
        manager = SyncManager(ctx=get_context("spawn"))
        manager.start(initializer=helper_process.setup)
        filesystem_async._results_queue = manager.Queue()
    elif current is None:
        filesystem_async._results_queue = queue.Queue()


class _DropSyncSaveNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_SYNC_SAVE_NOTICE)


@contextmanager
def quiet_sync_save_notice():
    """Inside the block, megatron's notice that its async writer is deprecated is dropped."""
    require_release()
    logger, notice = logging.getLogger(_SAVE_LOGGER), _DropSyncSaveNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)
