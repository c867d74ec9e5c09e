"""keel's entry point: `torchrun --nproc-per-node N pretrain/main.py +experiment=NAME [overrides]`.

A plain `python pretrain/main.py ...` runs as a world of one. Add `-m` for Hydra sweeps.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pretrain import cpu_compat  # noqa: E402,F401  (silences megatron's import-time warnings)
from pretrain.config import register_configs  # noqa: E402

register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(raw: DictConfig) -> float | None:
    from pretrain.run import ConfigError, run

    try:
        return run(raw)
    except ConfigError as e:
        print(f"keel: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":  # required: megatron's checkpoint writer starts worker processes
    main()
