"""The one error a checkpoint raises: bad input (damaged, forged, incompatible, unwritable), one line."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint keel will not load, or cannot write; the message is the one line the user sees."""
