"""Errors by kind: bad input (config, data, tokenizer, checkpoint, storage) is keel's one line and exit
code 2; anything else is a bug and shows its traceback, even a ValueError raised mid-training."""

import errno
import json
import textwrap

import pytest

from tests.helpers import ROOT, run_keel, tiny_overrides


def test_each_layer_raises_its_kind_and_the_entry_point_prints_it_as_one_line(tmp_path, capsys, monkeypatch):
    from data.errors import DataError, DataNotFound, TokenizerNotFound
    from data.format import PackedDataset
    from data.loader import PackedLoader
    from data.sources import InputError
    from data.tokenizer import load_tokenizer
    from models.config import ConfigError
    from pretrain.checkpoint import CheckpointError, resolve
    from pretrain.config import ParallelConfig, compose_config
    from pretrain.distributed import check_world
    from pretrain.errors import DEBUG, bad_input_is_one_line

    monkeypatch.delenv(DEBUG, raising=False)
    # 1. each kind, where keel meets it: the config, a packed set, the loader, a tokenizer, a checkpoint
    sites = [(ConfigError, lambda: compose_config(["trainer.max_steps=0"])),
             (ConfigError, lambda: check_world(ParallelConfig(tensor=2), world_size=1)),
             (DataNotFound, lambda: PackedDataset(tmp_path / "nowhere")),
             (DataError, lambda: PackedLoader(None, global_batch=8, micro_batch=4, dp_rank=0, dp_size=4, seed=0)),
             (TokenizerNotFound, lambda: load_tokenizer(tmp_path / "nowhere.model")),
             (CheckpointError, lambda: resolve(tmp_path)),
             (InputError, lambda: (_ for _ in ()).throw(InputError("what the packer reads is bad; fix it")))]
    for kind, site in sites:
        with pytest.raises(SystemExit) as stop, bad_input_is_one_line():
            try:
                site()
            except kind:
                raise
            else:
                raise AssertionError(f"{site} raised no {kind.__name__}")
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith("keel: error: ") and err.count("\n") == 1, (kind, err)
    # 2. anything else passes through with its traceback, a ValueError or FileNotFoundError too
    for bug in (ValueError("a bug"), KeyError("a bug"), FileNotFoundError(errno.ENOENT, "a bug")):
        with pytest.raises(type(bug)), bad_input_is_one_line():
            raise bug
        assert capsys.readouterr().err == ""
    # 3. KEEL_DEBUG: bad input shows its traceback too
    monkeypatch.setenv(DEBUG, "1")
    with pytest.raises(ConfigError), bad_input_is_one_line():
        raise ConfigError("a bad setting")


def test_storage_refusing_a_write_is_one_line_and_any_other_os_error_is_not(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from models.config import ConfigError
    from pretrain import config, run

    monkeypatch.setattr(config, "to_config", lambda raw, overrides: SimpleNamespace(run_dir=str(tmp_path)))
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.jsonl"))
    monkeypatch.setattr(run, "_run", lambda cfg: (_ for _ in ()).throw(full))
    with pytest.raises(ConfigError, match=f"^no space left on the device writing {tmp_path / 'metrics.jsonl'}; free"):
        run.run(None)
    missing = FileNotFoundError(errno.ENOENT, "No such file or directory", str(tmp_path / "gone"))
    monkeypatch.setattr(run, "_run", lambda cfg: (_ for _ in ()).throw(missing))
    with pytest.raises(FileNotFoundError) as e:
        run.run(None)
    assert e.value is missing


def test_megatron_private_modules_refuse_another_megatron_release_in_one_line(monkeypatch):
    import megatron.core

    from models.config import ConfigError
    from optim import megatron_private as optim_private
    from pretrain.checkpoint import CheckpointError
    from pretrain.checkpoint import megatron_private as checkpoint_private
    optim_private.require_release()
    checkpoint_private.require_release()
    monkeypatch.setattr(megatron.core, "__version__", "0.20.0")
    for module, kind in ((optim_private, ConfigError), (checkpoint_private, CheckpointError)):
        with pytest.raises(kind, match=f"^{module.__name__} uses megatron-core 0.19.2's .* megatron-core 0.20.0 is "
                                       "installed; install megatron-core==0.19.2$") as e:
            module.require_release()
        assert "\n" not in str(e.value)


BUG = textwrap.dedent("""
    # a bug planted in a keel process: the optimizer's second step raises a ValueError
    from optim.optimizer import KeelOptimizer

    step, calls = KeelOptimizer.step, []

    def buggy_step(self, loss):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("a planted bug in the optimizer's step")
        return step(self, loss)

    KeelOptimizer.step = buggy_step
""")


def test_a_bug_mid_training_shows_its_traceback_not_a_config_error(tiny_data, tmp_path, monkeypatch):
    (tmp_path / "plugin").mkdir()
    (tmp_path / "plugin" / "planted_bug.py").write_text(BUG)
    monkeypatch.setenv("KEEL_PLUGINS", "planted_bug")  # imported first by every keel process
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'plugin'}:{ROOT}")
    run = tmp_path / "run"
    proc = run_keel(tiny_overrides(tiny_data, run, steps=3), check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]  # Python's exit code for an uncaught exception
    assert "Traceback" in proc.stderr and "ValueError: a planted bug in the optimizer's step" in proc.stderr
    assert "keel: error:" not in proc.stderr
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "failed" and result["step"] == 1 and "planted bug" in result["error"]
