"""Check keel checkpoints offline, as every load does (pretrain/checkpoint/manifest.py).

Each folder must hold exactly the files its manifest lists (plain names, each a kind keel or
megatron-core writes), each with its checksum; the manifest's signature must verify when
KEEL_CHECKPOINT_KEY is set; megatron's shard index must pass keel's allowlist.

    python tools/ckpt.py verify RUN_OR_CKPT [...]     # a run folder, its checkpoints/ or one step_N

Prints one line per checkpoint (OK, or what is wrong) and exits 1 if any fails. Nothing is moved:
only a resume sets a failing checkpoint aside.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pretrain import checkpoint


def checkpoints_at(path: Path) -> list[Path]:
    """Every step folder that `path` names: itself, or those of a checkpoints/ or run folder."""
    if checkpoint.step_dirs(path):
        return [p for _, p in checkpoint.step_dirs(path)]
    if checkpoint.step_dirs(path / "checkpoints"):
        return [p for _, p in checkpoint.step_dirs(path / "checkpoints")]
    if path.is_dir() and ((path / checkpoint.MANIFEST).exists() or (path / checkpoint.META).exists()):
        return [path]
    raise checkpoint.CheckpointError(f"no checkpoint at {path}; point at a run folder, its checkpoints/ or a step_N "
                                     "folder")


def verify(paths: list[Path]) -> int:
    failed = 0
    for path in paths:
        for folder in checkpoints_at(path):
            problem = checkpoint.verify(folder, collective=False)
            print(f"{folder}: {'OK' if problem is None else 'FAILED: ' + problem}")
            failed += problem is not None
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("verify", help="check each checkpoint against its manifest, as every load does")
    check.add_argument("paths", nargs="+", type=Path)
    args = parser.parse_args(argv)
    try:
        return verify(args.paths)
    except checkpoint.CheckpointError as e:
        print(f"ckpt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
