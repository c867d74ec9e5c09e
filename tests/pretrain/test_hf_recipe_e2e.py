"""The README's continual-pretraining recipes end to end, on a tiny Qwen2-MoE built here (Qwen2 attention
with q/k/v biases, routed experts with un-normalised top-k weights, a sigmoid-gated shared expert, a dense
layer between MoE layers): import -> pack with the model's tokenizer -> a step-0 validation and a few steps
of mixed continual pretraining (80% new domain, 20% replay) with the specialization losses L_o and L_v and
the router statistics -> export as Qwen2MoeForCausalLM -> transformers reloads it with the logits keel
computes -> evaluate --json."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, child_env, metrics, run_keel
from tests.hf_helpers import VOCAB, hf_logits, keel_logits, relative_error, tiny_family, tiny_tokenizer


def _pack(tokenizer, subset: str, split: str, n: int, prefix) -> str:
    from data.corpus import stdlib_documents
    from data.pipeline import pack_documents

    docs = [d for _, d in zip(range(n), stdlib_documents(subset, split))]
    pack_documents(docs, tokenizer, 64, "concat", str(prefix), progress=False)
    return str(prefix)


@pytest.mark.slow
def test_import_pack_mix_train_export_reload(tmp_path, megatron_world):
    from transformers import AutoModelForCausalLM

    from data.tokenizer import load_tokenizer
    from tools.export_hf import export_model
    from tools.generate import load_model
    from tools.import_hf import import_model

    # 1. a published model with its tokenizer, imported
    hf = tiny_family(tmp_path / "hf", tiny_tokenizer(tmp_path / "tok"), "Qwen2MoeForCausalLM")
    ckpt = import_model(hf, tmp_path / "ckpt")
    # 2. the new domain, the replay data and both validation sets, packed with the model's tokenizer
    tok = load_tokenizer(hf)
    new, replay = _pack(tok, "tests", "train", 12, tmp_path / "new"), _pack(tok, "code", "train", 12, tmp_path / "replay")
    new_val, replay_val = _pack(tok, "tests", "val", 3, tmp_path / "new_val"), _pack(tok, "code", "val", 3, tmp_path / "code_val")
    # 3. continual pretraining: the architecture and tokenizer come from init_from, the mixture from data.sources
    run = tmp_path / "run"
    run_keel([f"run_dir={run}", f"init_from={ckpt}", "data.seq_len=64", "model.moe.ortho_loss=0.01",
              "model.moe.var_loss=0.01",
              f"data.sources=[{{path: {new}, weight: 0.8}}, {{path: {replay}, weight: 0.2, name: replay}}]",
              f"data.val_path={new_val}", f"data.val_sets=[{{name: code, path: {replay_val}}}]",
              "trainer.max_steps=4", "trainer.eval_interval=2", "trainer.eval_batches=1", "checkpoint.interval=4",
              "trainer.progress=false", "logging.tensorboard=false", "logging.plot=false", "lr.warmup_steps=0"])
    rows = metrics(run)
    first, last = rows[0], rows[-1]
    # the starting model validated before step 1 (on by default for init_from), on every set
    assert first["step"] == 0 and {"val_loss", "val_loss/code"} <= set(first) and "loss" not in first
    assert json.loads((run / "result.json").read_text())["initial_val_loss"] == first["val_loss"]
    # both losses and the router statistics on the imported layout: MoE layers 1 and 3, layer 2 dense
    assert last["moe/ortho_loss"] > 0 and last["moe/var_loss"] < 0 and "moe/layer3/maxvio" in last  # L_v = -Var
    assert "moe/layer2/maxvio" not in last
    assert last["tokens_seen/new"] + last["tokens_seen/replay"] == 4 * 8 * 64
    assert abs(last["tokens_seen/replay"] / (4 * 8 * 64) - 0.2) <= 1 / 32  # within one row of 20%
    assert {"val_loss", "val_loss/code"} <= set(last) and last["val_loss"] != last["val_loss/code"]
    config = json.loads((run / "run_info.json").read_text())["config"]
    assert config["model"]["num_layers"] == 3 and config["data"]["tokenizer"] == str(ckpt / "tokenizer")
    # 4. export in the family recorded at import (followed through init_from); transformers loads it as it is
    out = export_model(run, tmp_path / "exported")
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    trained = keel_logits(load_model(str(run)).gpt, tokens)
    assert relative_error(hf_logits(out, tokens), trained) <= 1e-5
    assert relative_error(hf_logits(hf, tokens), trained) > 1e-3  # training did change the model
    assert model.config.vocab_size == 320
    # 5. the exported folder evaluated as a user would
    corpus = tmp_path / "held_out.jsonl"
    text = "def add(a, b):\n    return a + b\n" * 20
    corpus.write_text(json.dumps({"text": text}) + "\n")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate.py"), "--checkpoint", str(out), "--input",
                           str(corpus), "--json"], cwd=ROOT, env=child_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == {"loss", "bits_per_byte", "tokens", "bytes"} and result["bytes"] == len(text)
    assert 0 < result["loss"] < 10
