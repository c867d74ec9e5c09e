"""Checkpoints that cannot lie: atomic, checksummed, verified before loading, reshardable.

Layout of ``run_dir/checkpoints/step_00000100/``:
- megatron's dist_checkpointing files (torch_dist): the sharded model and optimizer. The distributed
  optimizer's state is saved `fully_reshardable`, so a checkpoint resumes at another TP/PP/DP layout;
  its two pickles (the shard index and the shards' objects) are read restricted (`safe_pickle`);
- ``keel_rank00000.safetensors`` per rank: keel's own state (trainer counters, loader position, RNG,
  the optimizer's update rule, callbacks) as tensors plus a JSON tree in the file's metadata (`state`);
- ``meta.json``: step, model signature, parallel layout, megatron-core release (`meta`);
- ``manifest.json``, written last: the size and SHA-256 of every other file (`manifest`), signed when a
  checkpoint key is configured.

Everything is written under ``step_N.tmp`` and renamed once every rank has finished, so a crash mid-save
(even ``kill -9``) never leaves a folder that looks complete. Every load (`load`: resume, init_from, the
tools) verifies the manifest first; at resume a checkpoint that fails is moved aside to ``step_N.bad``
(never deleted) and the newest one that passes is used (`storage`). If checkpoints exist but none
passes, the run stops: it never silently starts from scratch.

The modules, one concern each: `storage` (folders, retention, resume selection, storage errors),
`manifest` (checksums, signature, verification), `safe_pickle` (torch's pickle readers, restricted),
`state` (keel's state codec and the RNG), `meta` (what a checkpoint is, checked against the run),
`async_save` (background saves), `io` (save and load), `megatron_private` (megatron-core's private API,
for the release it was written for). None keeps state between calls: a run's `Checkpoints` holds what
it verified and the save in flight.
"""

from pretrain.checkpoint.errors import CheckpointError
from pretrain.checkpoint.io import Checkpoints, Restored, Snapshot, load
from pretrain.checkpoint.manifest import MANIFEST, require_verified, verify, write_manifest
from pretrain.checkpoint.meta import META, check_compatible, check_layout, read_meta
from pretrain.checkpoint.state import derive_rng
from pretrain.checkpoint.storage import Selection, latest, resolve, step_dirs, storage_problem

__all__ = ["MANIFEST", "META", "CheckpointError", "Checkpoints", "Restored", "Selection", "Snapshot",
           "check_compatible", "check_layout", "derive_rng", "latest", "load", "read_meta", "require_verified",
           "resolve", "step_dirs", "storage_problem", "verify", "write_manifest"]
