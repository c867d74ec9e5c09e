"""Experiments launch through Hydra multirun: the presets send their sweeps where the reports read, and
the local (joblib) launcher runs sweep points side by side into run folders the reports load."""

import pytest

from tests.helpers import ROOT, run_keel, tiny_overrides
from tools.experiments.runs import by_arm, load_runs

# preset -> the root its report reads (the commands in tools/experiments/*.py and docs/results/*.md)
REPORT_ROOTS = {"warmup_free_adamw": "runs/warmup_free", "warmup_free_adamw_warmup": "runs/warmup_free",
                "warmup_free_spectral": "runs/warmup_free", "warmup_free_quack": "runs/warmup_free",
                "moe_specialization": "runs/moe_spec", "moe_dense_baseline": "runs/moe_spec",
                "attention_quality": "runs/attention_quality", "attention_d128": "runs/attention_d128",
                "cpt_packing": "runs/cpt_packing"}


def _sweep_folder(preset: str, overrides: list[str]) -> tuple[str, str]:
    """(hydra.sweep.dir, hydra.sweep.subdir) of one sweep point of `preset`."""
    from hydra import compose, initialize_config_dir

    from pretrain.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={preset}", *overrides], return_hydra_config=True)
    return cfg.hydra.sweep.dir, cfg.hydra.sweep.subdir


def test_presets_sweep_into_their_reports_roots_without_sharing_a_folder():
    folders = {p: _sweep_folder(p, ["seed=1", "optim.lr=0.01"]) for p in REPORT_ROOTS}
    assert {p: d for p, (d, _) in folders.items()} == REPORT_ROOTS
    # presets that share a root (e.g. one sweep over +experiment=a,b) must not share a run folder:
    # a second run in a folder would resume the first one's checkpoint
    assert len(set(folders.values())) == len(folders)


def test_cpt_driver_reads_the_folder_its_grid_sweeps_into():
    from tools.experiments import cpt_experiment

    assert str(cpt_experiment.setup().cpt_dir) == REPORT_ROOTS["cpt_packing"]


@pytest.mark.slow
def test_local_launcher_runs_two_points_at_once_into_loadable_run_folders(tiny_data, tmp_path):
    sweep = tmp_path / "sweep"
    over = [o for o in tiny_overrides(tiny_data, sweep, steps=2) if not o.startswith("run_dir=")]
    # many overrides would make a folder name longer than a file name may be: name the folders by seed
    run_keel(["-m", "hydra/launcher=local", "hydra.launcher.n_jobs=2", *over, "seed=1,2",
              f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=s${seed}"])
    # 1. both points completed, with a checkpoint
    arms = by_arm(load_runs(sweep), lambda run: run.config["name"])
    assert list(arms) == ["smoke"] and list(arms["smoke"]) == [1, 2]
    for seed, run in arms["smoke"].items():
        assert run.name == f"s{seed}" and run.last("val_loss") is not None
        assert (run.folder / "checkpoints" / "step_00000002").is_dir()
    # 2. joblib ran them (it names its jobs main_<index>; the basic launcher numbers them) with two workers.
    #    Whether the two runs overlap in time is the scheduler's: a worker that finishes its run before the
    #    other worker has started takes the second run too, so that is not asserted
    assert sorted(_job_id(sweep / f"s{s}") for s in (1, 2)) == ["main_0", "main_1"]
    assert {_launcher(sweep / f"s{s}")["n_jobs"] for s in (1, 2)} == {2}


def _job_id(run_dir) -> str:
    from omegaconf import OmegaConf

    return str(OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.job.id)


def _launcher(run_dir) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.launcher)
