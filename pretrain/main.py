"""keel's entry point: `torchrun --nproc-per-node N pretrain/main.py +experiment=NAME [overrides]`.

A plain `python pretrain/main.py ...` runs as a world of one. Add `-m` for Hydra sweeps.
"""

from __future__ import annotations

import multiprocessing
import sys

import hydra
from omegaconf import DictConfig

# Nothing heavy at module level: a process spawned by the trainer (the checkpoint writer's helper) imports
# this file as `__mp_main__`. torch, megatron and the configs are imported under `__main__` below.


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(raw: DictConfig) -> float | None:
    from pretrain.errors import bad_input_is_one_line
    from pretrain.run import run

    # a joblib launcher worker (hydra/launcher=local) makes loky's its default start method, which the
    # process megatron's checkpoint writer starts cannot resolve: use the platform's own
    if multiprocessing.get_start_method(allow_none=True) not in (None, "fork", "spawn", "forkserver"):
        multiprocessing.set_start_method(None, force=True)

    with bad_input_is_one_line():  # config, data, tokenizer, checkpoint; anything else shows its traceback
        return run(raw)


def check_command_line(args: list[str]) -> None:
    """Compose a single run's overrides before Hydra does, so that a malformed or unknown override is
    keel's one line (exit 2) rather than Hydra's report; sweeps (-m) and Hydra's flags are left to Hydra."""
    if any(a.startswith("-") for a in args):
        return
    from pretrain.config import compose_config
    from pretrain.errors import bad_input_is_one_line

    with bad_input_is_one_line():
        compose_config(args)


if __name__ == "__main__":  # required: megatron's checkpoint writer starts worker processes
    from pretrain import cpu_compat  # noqa: F401  (silences megatron's import-time warnings)
    from pretrain.config import register_configs

    register_configs()
    check_command_line(sys.argv[1:])
    main()
