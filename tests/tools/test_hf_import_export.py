"""tools/import_hf.py, tools/export_hf.py and tools/evaluate.py on tiny Llama models built here from a
config (nothing is downloaded): logits equal to transformers' at TP=1, TP=2 and PP=2, an exact
keel -> HF -> keel round trip, equal evaluation of a folder and its import, and one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, child_env
from tests.hf_helpers import (VOCAB, hf_logits, keel_logits, llama_config, relative_error, tiny_llama,
                              tiny_tokenizer)

TOL = 1e-4  # max|Δ| / max|logit|, fp32


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory, hf_tok):
    """Untied GQA with llama3 RoPE scaling whose factors are not megatron's defaults, in 5 shards; the
    model predicts 320 tokens (more than the tokenizer's 300), padded to 384 rows by the import."""
    return tiny_llama(tmp_path_factory.mktemp("llama"), hf_tok, llama_config(vocab=320), shard_size="100KB")


@pytest.fixture(scope="module")
def imported(llama, tmp_path_factory, megatron_world):
    from tools.import_hf import import_model

    return import_model(llama, tmp_path_factory.mktemp("imp") / "ckpt")


def _tokens(b: int = 2, s: int = 100) -> torch.Tensor:  # past original_max_position_embeddings=64
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(0))


def _keel(ckpt):
    from tools.generate import load_model

    return load_model(str(ckpt))


def test_imported_logits_equal_transformers_at_one_process(llama, imported):
    loaded = _keel(imported)
    assert loaded.gpt.vocab_size == 384 and loaded.gpt.unpadded_vocab_size == 320
    assert relative_error(keel_logits(loaded.gpt, _tokens()), hf_logits(llama, _tokens())) <= TOL
    info = json.loads((imported / "run_info.json").read_text())
    m = info["config"]["model"]
    assert (m["norm_eps"], m["rotary_base"], m["rope_scaling"]["low_freq_factor"], m["final_norm"]) == (3e-6, 5000.0, 2.0, True)
    assert info["config"]["attention"] == {**info["config"]["attention"], "type": "gqa", "num_query_groups": 2}


@pytest.mark.parametrize("kv_heads, tie, cls", [(4, True, "MistralForCausalLM"), (1, False, "LlamaForCausalLM")])
def test_mha_tied_mistral_and_mqa_import_exactly(tmp_path, hf_tok, megatron_world, kv_heads, tie, cls):
    import transformers

    from tools.import_hf import import_model

    config = getattr(transformers, cls.replace("ForCausalLM", "Config"))(
        **{**llama_config(kv_heads=kv_heads, tie=tie, rope={"rope_type": "default", "rope_theta": 20000.0}).to_dict(),
           "architectures": [cls], "sliding_window": None})
    folder = tiny_llama(tmp_path / "hf", hf_tok, config, cls=getattr(transformers, cls))
    ckpt = import_model(folder, tmp_path / "ckpt")
    assert relative_error(keel_logits(_keel(ckpt).gpt, _tokens()), hf_logits(folder, _tokens())) <= TOL


def test_tp2_pp2_and_dp2_logits_and_lm_eval_scores_equal_one_process(llama, imported, tmp_path, capsys):
    """An import's logits at TP=2 and at PP=2 equal transformers'; keel's lm-eval adapter there gives the
    log-likelihoods it gives at one process; `tools/evaluate.py --tasks` at TP=2, PP=2 (log-likelihood tasks;
    a generation task is one line) and DP=2 prints, on the first rank only, the scores of one process."""
    from tests.lm_eval_helpers import choice_requests, write_tasks

    pytest.importorskip("lm_eval", reason="the eval extra (tools/setup.sh installs it)")
    tasks = write_tasks(tmp_path / "tasks")
    torch.save(_tokens(), tmp_path / "tokens.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "tools" / "hf_parallel_worker.py"), str(imported), str(tmp_path / "tokens.pt"),
           str(tmp_path / "tasks"), str(tmp_path / "out.pt")]
    proc = subprocess.run(cmd, cwd=ROOT, env={**child_env(), "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out, reference = torch.load(tmp_path / "out.pt"), hf_logits(llama, _tokens())
    for logits in (out["tp2"], out["pp2"]):
        assert logits.shape[-1] == 384 and relative_error(logits[..., :320], reference) <= TOL
        assert torch.isneginf(logits[..., 320:]).all()  # padded rows, masked on the TP rank that holds them
    from pretrain.downstream import KeelLM
    from tools.evaluate import main as evaluate

    # 1. the adapter's log-likelihoods of each request
    loaded = _keel(imported)  # one process: the module's megatron world of one
    one = KeelLM(loaded.gpt, loaded.tokenizer, loaded.cfg.model.max_seq_len).loglikelihood(choice_requests())
    for name in ("tp2", "pp2"):
        assert len(out[f"{name}_loglikelihoods"]) == len(one) > 10
        for (got, got_greedy), (ref, greedy) in zip(out[f"{name}_loglikelihoods"], one):
            assert got == pytest.approx(ref, rel=1e-5) and got_greedy == greedy
    # 2. every metric of every task, printed by the first rank alone
    capsys.readouterr()
    assert evaluate(["--checkpoint", str(imported), "--json", "--bootstrap-iters", "0", "--tasks",
                     ",".join(str(p) for p in tasks.values())]) == 0
    single = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]
    for name, kinds in (("tp2", {"keel_mc", "keel_gen", "keel_rolling"}), ("pp2", {"keel_mc", "keel_rolling"}),
                        ("dp2", {"keel_mc", "keel_gen", "keel_rolling"})):
        (code0, printed, _), (code1, silent, _) = out[f"{name}_cli"]
        assert code0 == code1 == 0 and silent == ""
        results = json.loads(printed.strip().splitlines()[-1])["results"]
        assert set(results) == kinds
        for task in kinds:
            scores = {k: v for k, v in single[task].items() if isinstance(v, float)}
            assert scores and scores.keys() <= results[task].keys()
            assert all(results[task][k] == pytest.approx(v, rel=1e-5) for k, v in scores.items()), (name, task)
    for code, printed, err in out["pp2_generation"]:
        [line] = [x for x in err.splitlines() if x.startswith("evaluate.py:")]  # lm-eval's own warnings aside
        assert code == 2 and printed == "" and line.startswith("evaluate.py: error: generation tasks need pipeline")


def test_keel_to_hf_to_keel_reproduces_the_weights_exactly(llama, imported, tmp_path, megatron_world):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tools.export_hf import export_model
    from tools.import_hf import import_model

    exported = export_model(imported, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in exported.iterdir()}
    _, info = AutoModelForCausalLM.from_pretrained(str(exported), output_loading_info=True)
    assert not any(info.values())  # no missing, unexpected or mismatched tensors
    original = {k: v for f in llama.glob("*.safetensors") for k, v in load_file(f).items()}
    assert set(load_file(exported / "model.safetensors")) == set(original)
    assert all(torch.equal(t, original[k]) for k, t in load_file(exported / "model.safetensors").items())
    again = {k: p for k, p in _keel(import_model(exported, tmp_path / "again")).gpt.named_parameters()}
    assert all(torch.equal(p, again[k]) for k, p in _keel(imported).gpt.named_parameters())


def test_evaluate_gives_the_same_loss_on_the_folder_and_its_import(llama, imported, tmp_path, megatron_world):
    from tools.evaluate import evaluate

    corpus = tmp_path / "held_out.jsonl"
    from data.corpus import stdlib_documents

    docs = [d.text[:3000] for _, d in zip(range(6), stdlib_documents("tests", "val"))]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    hf, keel = evaluate(str(llama), [str(corpus)], seq_len=48), evaluate(str(imported), [str(corpus)], seq_len=48)
    assert hf["tokens"] == keel["tokens"] > 1000 and hf["bytes"] == keel["bytes"] == sum(len(t.encode()) for t in docs)
    assert abs(hf["loss"] - keel["loss"]) < 1e-5 and abs(hf["bits_per_byte"] - keel["bits_per_byte"]) < 1e-5
    big = tiny_tokenizer(tmp_path / "big", vocab=400)
    with pytest.raises(ValueError, match=r"^tokenizer .*big has 400 tokens but .* predicts 320; use the model's own"):
        evaluate(str(imported), [str(corpus)], tokenizer=str(big))


def test_the_cli_reports_a_missing_folder_in_one_line(tmp_path, megatron_world, capsys):
    from tools.import_hf import main

    assert main(["--model", str(tmp_path / "nope"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"import_hf.py: error: model folder {tmp_path / 'nope'} not found")


def _variant(tmp_path, llama, edit):
    folder = tmp_path / "variant"
    shutil.copytree(llama, folder)
    edit(folder)
    return folder


def _config_edit(**changes):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return edit


def _swap_shard(folder):
    """The shard holding the embedding replaced by another model's (hidden 32)."""
    other = tiny_llama(folder.parent / "other", None, llama_config(vocab=320, hidden_size=32), shard_size="100KB")
    shard = {f: json.loads((f / "model.safetensors.index.json").read_text())["weight_map"]["model.embed_tokens.weight"]
             for f in (folder, other)}
    shutil.copy(other / shard[other], folder / shard[folder])


def _pickle_only(folder):
    from safetensors.torch import load_file

    tensors = {k: v for f in folder.glob("*.safetensors") for k, v in load_file(f).items()}
    for f in [*folder.glob("*.safetensors"), folder / "model.safetensors.index.json"]:
        f.unlink()
    torch.save(tensors, folder / "pytorch_model.bin")


def _index_names(shard_name: str):
    """The index points the embedding at `shard_name`; for a pickle, that file holds the tensors, pickled."""
    def edit(folder):
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        if shard_name.endswith(".bin"):
            torch.save({"model.embed_tokens.weight": torch.zeros(1)}, folder / shard_name)
        index["weight_map"]["model.embed_tokens.weight"] = shard_name
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return edit


def _big_tokenizer(folder):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (folder / f).unlink()
    tiny_tokenizer(folder, vocab=400)


@pytest.mark.parametrize("edit, message", [
    (_config_edit(architectures=["GPT2LMHeadModel"], model_type="gpt2"), "cannot import GPT2LMHeadModel; keel imports "
                                                                          "LlamaForCausalLM"),
    (_config_edit(architectures=["KeelForCausalLM"], model_type="keel_custom", auto_map={"AutoConfig": "x.Config"}),
     "describes KeelForCausalLM, which transformers cannot read without remote code"),
    (_config_edit(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=16),
     "cannot import a model with a sliding window of 16; keel imports LlamaForCausalLM"),
    (_config_edit(hidden_act="gelu", attention_bias=True), "cannot import a model with activation gelu, biases"),
    (_swap_shard, r"tensor model.embed_tokens.weight has shape \[320, 32\], config.json implies \[320, 64\]"),
    (_pickle_only, r"has only pickled weights \(pytorch_model.bin\).* pass --allow-pickle"),
    (_index_names("weights.bin"), r"names shard weights.bin, which is not a safetensors file .* pass --allow-pickle"),
    (_index_names("../other/model.safetensors"), r"names shard '../other/model.safetensors', which is not a file of"),
    (_big_tokenizer, "tokenizer .* has 400 tokens but .* predicts 320"),
])
def test_bad_inputs_are_one_line_errors(tmp_path, llama, megatron_world, edit, message):
    from pretrain.errors import BAD_INPUT
    from tools.import_hf import import_model

    folder = _variant(tmp_path, llama, edit)
    with pytest.raises(BAD_INPUT, match=message) as e:  # keel's kinds of bad input: the CLI's one line
        import_model(folder, tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_pickled_weights_load_with_allow_pickle(tmp_path, llama, megatron_world):
    from tools.import_hf import import_model

    ckpt = import_model(_variant(tmp_path, llama, _pickle_only), tmp_path / "out", allow_pickle=True)
    assert relative_error(keel_logits(_keel(ckpt).gpt, _tokens()), hf_logits(llama, _tokens())) <= TOL


def test_export_refuses_attention_without_a_llama_equivalent(tmp_path, megatron_world, hf_tok):
    from dataclasses import asdict

    from pretrain.checkpoint import Checkpoints, Snapshot
    from pretrain.rundir import write_json
    from pretrain.run import model_signature
    from tests.helpers import build_tiny_gpt
    from tools.export_hf import export_model

    cfg, gpt = build_tiny_gpt(["attention=gta", "model.final_norm=true", f"data.tokenizer={hf_tok}"], vocab_size=VOCAB)
    Checkpoints(tmp_path / "run" / "checkpoints", keep_last=1).save(
        Snapshot(1, gpt, signature=model_signature(cfg, VOCAB)))
    write_json(tmp_path / "run" / "run_info.json", {"config": asdict(cfg), "tokenizer": {"path": str(hf_tok)}},
               default=str)
    with pytest.raises(ValueError, match=r"^attention=gta has no Hugging Face Llama equivalent; export takes dense "
                                         r"mha/gqa/mqa models \(GTA, GLA, MLA and MoE") as e:
        export_model(tmp_path / "run", tmp_path / "hf")
    assert "\n" not in str(e.value) and not (tmp_path / "hf").exists()


def test_init_from_an_import_brings_its_architecture_and_tokenizer_unless_the_command_line_says(imported):
    from pretrain.config import compose_config

    from dataclasses import asdict

    cfg = compose_config([f"init_from={imported}", "data.seq_len=64"])
    saved = json.loads((imported / "run_info.json").read_text())["config"]
    assert asdict(cfg.model) == saved["model"] and asdict(cfg.attention) == saved["attention"]
    assert cfg.model.num_layers == 2 and cfg.model.rope_scaling.original_max_positions == 64
    assert cfg.data.tokenizer == str(imported / "tokenizer")
    mine = compose_config([f"init_from={imported}", "model.max_seq_len=96", "data.seq_len=64", "data.tokenizer=t"])
    assert mine.model.max_seq_len == 96 and mine.model.hidden_size == 64 and mine.data.tokenizer == "t"
    assert compose_config(["data.seq_len=64"]).model.num_layers == 4  # conf/model/small.yaml without init_from
