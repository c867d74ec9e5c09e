"""tools/import_hf.py, tools/export_hf.py and tools/evaluate.py on tiny models of every family keel
converts (Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen3-MoE, Qwen2-MoE), built here from transformers'
config classes (nothing is downloaded): logits equal to transformers' at TP=1, and at TP=2 (every family;
the MoE families sequence parallel), PP=2 (Llama) and EP=2 (MoE) in one torchrun world; export ->
transformers reload in the family's own class; an exact HF -> keel -> HF -> keel round trip; equal
evaluation of a folder and its import; one-line refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, child_env
from tests.hf_helpers import (VOCAB, hf_logits, keel_logits, llama_config, relative_error, tiny_family, tiny_llama,
                              tiny_tokenizer)

TOL = 1e-5  # max|Δ| / max|logit|, fp32
DENSE = ("Qwen2ForCausalLM", "Qwen3ForCausalLM")
MOE = ("MixtralForCausalLM", "Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM")


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


@pytest.fixture(scope="module")
def families(tmp_path_factory, hf_tok, megatron_world):
    """Each new family's tiny model (tests/hf_helpers.py's family_config) and its import; the Qwen families
    with a tokenizer that, like Qwen's, has no BOS."""
    from tools.import_hf import import_model

    no_bos, out = tiny_tokenizer(tmp_path_factory.mktemp("tok_no_bos"), bos=False), {}
    for arch in DENSE + MOE:
        folder = tiny_family(tmp_path_factory.mktemp(arch), no_bos if arch.startswith("Qwen") else hf_tok, arch)
        out[arch] = folder, import_model(folder, tmp_path_factory.mktemp("imp") / arch)
    return out


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

    from tools.export_hf import export_model
    from tools.import_hf import import_model

    config = getattr(transformers, cls.replace("ForCausalLM", "Config"))(
        **{**llama_config(kv_heads=kv_heads, tie=tie, rope={"rope_type": "default", "rope_theta": 20000.0}).to_dict(),
           "architectures": [cls], "sliding_window": None})
    folder = tiny_llama(tmp_path / "hf", hf_tok, config, cls=getattr(transformers, cls))
    ckpt = import_model(folder, tmp_path / "ckpt")
    assert relative_error(keel_logits(_keel(ckpt).gpt, _tokens()), hf_logits(folder, _tokens())) <= TOL
    exported = export_model(ckpt, tmp_path / "out")  # a Mistral goes back out as a Mistral (keel once wrote Llama)
    assert json.loads((exported / "config.json").read_text())["architectures"] == [cls]
    assert relative_error(hf_logits(exported, _tokens()), hf_logits(folder, _tokens())) == 0


@pytest.mark.parametrize("arch", DENSE + MOE)
def test_each_family_imports_with_transformers_logits(families, arch):
    folder, ckpt = families[arch]
    loaded = _keel(ckpt)
    assert relative_error(keel_logits(loaded.gpt, _tokens()), hf_logits(folder, _tokens())) <= TOL
    cfg = loaded.cfg
    info = json.loads((ckpt / "run_info.json").read_text())
    assert info["imported_from"]["architecture"] == arch
    m, a = cfg.model, cfg.attention
    assert (a.qkv_bias, a.qk_norm) == (arch.startswith("Qwen2"), arch.startswith("Qwen3"))
    assert m.kv_channels == (24 if arch.startswith("Qwen3") else 16) and m.rotary_base == 1e6
    placement = {"MixtralForCausalLM": [1, 1, 1]}.get(arch, [1, 0, 1])  # Qwen's mlp_only_layers=[1]
    assert m.moe.moe_layers(m.num_layers) == (placement if arch in MOE else [0, 0, 0])
    assert m.moe.norm_topk == (arch != "Qwen2MoeForCausalLM") and m.moe.shared_expert_size == (
        56 if arch == "Qwen2MoeForCausalLM" else None)


def test_parallel_layouts_give_transformers_logits_and_lm_eval_scores(llama, imported, families, tmp_path, capsys):
    """One 2-process world for every family: its logits at TP=2 (the MoE families with sequence parallelism,
    each TP rank routing half of every sequence), PP=2 (Llama) and EP=2 (MoE) equal transformers'. On the
    Llama import, keel's lm-eval adapter at TP=2 and PP=2 gives the log-likelihoods it gives at one process;
    `tools/evaluate.py --tasks` at TP=2, PP=2 (log-likelihood tasks; a generation task is one line) and DP=2
    prints, on the first rank only, the scores of one process."""
    from tests.lm_eval_helpers import choice_requests, write_tasks

    pytest.importorskip("lm_eval", reason="the eval extra (tools/setup.sh installs it)")
    tasks = write_tasks(tmp_path / "tasks")
    torch.save(_tokens(), tmp_path / "tokens.pt")
    jobs = [f"tp2:llama={imported}", f"pp2:llama={imported}"] + [f"tp2:{a}={families[a][1]}" for a in DENSE + MOE]
    jobs += [f"ep2:{a}={families[a][1]}" for a in MOE] + [f"dp2:llama={imported}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "tools" / "hf_parallel_worker.py"), str(tmp_path / "tokens.pt"),
           str(tmp_path / "tasks"), str(tmp_path / "out.pt"), *jobs]
    proc = subprocess.run(cmd, cwd=ROOT, env={**child_env(), "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = torch.load(tmp_path / "out.pt")
    jobs = [job for job in jobs if not job.startswith("dp2:")]  # DP=2 scores lm-eval tasks only
    assert {key for key in out if ":" in key} == {job.split("=")[0] for job in jobs}
    for job in jobs:
        key, name = job.split("=")[0], job.split("=")[0].split(":")[1]
        reference = hf_logits(llama if name == "llama" else families[name][0], _tokens())
        logits = out[key]
        assert logits.shape[-1] == 384 and relative_error(logits[..., :320], reference) <= TOL, key
        assert torch.isneginf(logits[..., 320:]).all()  # padded rows, masked on the TP rank that holds them
        assert out[f"sequence_parallel/{key.replace(':', '/')}"] == (key.startswith("tp2:") and name in MOE), key
        if key.startswith("tp2:") and name in MOE:  # as decoding and tools/evaluate.py build it: no SP
            assert relative_error(out[f"without_sequence_parallel/tp2/{name}"][..., :320], reference) <= TOL, name
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


@pytest.mark.parametrize("arch", DENSE + MOE)
def test_each_family_exports_as_itself_and_round_trips_exactly(families, arch, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tools.export_hf import export_model
    from tools.import_hf import import_model

    folder, ckpt = families[arch]
    exported = export_model(ckpt, tmp_path / "hf")
    model, info = AutoModelForCausalLM.from_pretrained(str(exported), output_loading_info=True)
    assert type(model).__name__ == arch and not any(info.values())  # no missing, unexpected or mismatched
    assert (model.config.bos_token_id is None) == arch.startswith("Qwen") and model.config.eos_token_id == 1
    original, written = load_file(folder / "model.safetensors"), load_file(exported / "model.safetensors")
    assert set(written) == set(original) and all(torch.equal(t, original[k]) for k, t in written.items())
    assert relative_error(hf_logits(exported, _tokens()), hf_logits(folder, _tokens())) == 0
    again = {k: p for k, p in _keel(import_model(exported, tmp_path / "again")).gpt.named_parameters()}
    assert all(torch.equal(p, again[k]) for k, p in _keel(ckpt).gpt.named_parameters())


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


@pytest.mark.parametrize("name", ["llama", "Qwen2MoeForCausalLM"])  # logits of every family: above
def test_evaluate_gives_the_same_loss_on_the_folder_and_its_import(llama, imported, families, name, tmp_path):
    from data.corpus import stdlib_documents
    from tools.evaluate import evaluate

    folder, ckpt = (llama, imported) if name == "llama" else families[name]
    corpus = tmp_path / "held_out.jsonl"
    docs = [d.text[:3000] for _, d in zip(range(6), stdlib_documents("tests", "val"))]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    hf, keel = evaluate(str(folder), [str(corpus)], seq_len=48), evaluate(str(ckpt), [str(corpus)], seq_len=48)
    assert hf["tokens"] == keel["tokens"] > 1000 and hf["bytes"] == keel["bytes"] == sum(len(t.encode()) for t in docs)
    assert abs(hf["loss"] - keel["loss"]) < 1e-5 and abs(hf["bits_per_byte"] - keel["bits_per_byte"]) < 1e-5
    if name != "llama":
        return
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
    (_config_edit(architectures=["GPT2LMHeadModel"], model_type="gpt2"),
     "cannot import GPT2LMHeadModel; keel imports Llama, Mistral, Qwen2/Qwen2.5, Qwen3, Mixtral"),
    (_config_edit(architectures=["KeelForCausalLM"], model_type="keel_custom", auto_map={"AutoConfig": "x.Config"}),
     "describes KeelForCausalLM, which transformers cannot read without remote code"),
    (_config_edit(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=16),
     "cannot import MistralForCausalLM with a sliding window of 16 in use; keel imports Llama"),
    # transformers 5 says it per layer (config.layer_types), from use_sliding_window and max_window_layers
    (_config_edit(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=True, sliding_window=16,
                  max_window_layers=1), "cannot import Qwen2ForCausalLM with a sliding window of 16 in use"),
    (_config_edit(architectures=["Qwen3ForCausalLM"], model_type="qwen3", sliding_window=16, use_sliding_window=True,
                  layer_types=["full_attention", "sliding_attention"]),
     "cannot import Qwen3ForCausalLM with a sliding window of 16 in use"),
    (_config_edit(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_experts=4,
                  rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                   "original_max_position_embeddings": 32}),
     "cannot import Qwen3MoeForCausalLM with rope type yarn; keel imports"),
    (_config_edit(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", num_experts=4,
                  shared_expert_intermediate_size=0), "cannot import Qwen2MoeForCausalLM with a shared expert of "
                                                      r"width 0 \(keel imports one of width > 0 with its sigmoid gate"),
    (_config_edit(hidden_act="gelu", attention_bias=True),
     "cannot import LlamaForCausalLM with activation gelu, biases on the output or MLP projections"),
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


def _keel_run(folder, overrides: list[str], hf_tok):
    """A run folder holding a keel model built from scratch (keel's init, trained zero steps), and the model."""
    from dataclasses import asdict

    from pretrain.checkpoint import Checkpoints, Snapshot
    from pretrain.rundir import write_json
    from pretrain.run import model_signature
    from tests.helpers import build_tiny_gpt

    cfg, gpt = build_tiny_gpt(overrides + ["model.final_norm=true", f"data.tokenizer={hf_tok}"], vocab_size=VOCAB)
    Checkpoints(folder / "checkpoints", keep_last=1).save(Snapshot(1, gpt, signature=model_signature(cfg, VOCAB)))
    write_json(folder / "run_info.json", {"config": asdict(cfg), "tokenizer": {"path": str(hf_tok)}}, default=str)
    return gpt


def test_export_refuses_attention_without_a_llama_equivalent(tmp_path, megatron_world, hf_tok):
    from tools.export_hf import export_model

    _keel_run(tmp_path / "run", ["attention=gta"], hf_tok)
    with pytest.raises(ValueError, match=r"^attention=gta has no Hugging Face equivalent; export takes "
                                         r"mha/gqa/mqa attention \(GTA, GLA, MLA checkpoints stay in keel\)") as e:
        export_model(tmp_path / "run", tmp_path / "hf")
    assert "\n" not in str(e.value) and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("overrides, arch", [
    (["model.moe.num_experts=4", "model.moe.top_k=2"], "MixtralForCausalLM"),
    (["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.every=2", "model.moe.norm_topk=false",
      "attention.qk_norm=true"], "Qwen3MoeForCausalLM"),
])
def test_an_moe_trained_from_scratch_exports_as_the_family_that_holds_it(tmp_path, megatron_world, hf_tok,
                                                                          overrides, arch):
    from transformers import AutoModelForCausalLM

    from tools.export_hf import export_model

    gpt = _keel_run(tmp_path / "run", overrides, hf_tok)
    out = export_model(tmp_path / "run", tmp_path / "hf")
    model, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert type(model).__name__ == arch and not any(info.values())
    assert relative_error(hf_logits(out, _tokens(s=48)), keel_logits(gpt, _tokens(s=48))) <= TOL


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


def test_qwen_moe_placement_and_the_sliding_window_rules():
    from transformers import MistralConfig, Qwen2Config, Qwen2MoeConfig

    from models.hf import moe_placement, sliding_window

    # Qwen: MoE at every decoder_sparse_step-th layer counting from 1, unless listed in mlp_only_layers
    every_second = {"num_hidden_layers": 6, "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    assert moe_placement(every_second) == [0, 1, 0, 0, 0, 1]
    assert moe_placement({"num_hidden_layers": 3, "decoder_sparse_step": 1, "mlp_only_layers": []}) == [1, 1, 1]
    # use_sliding_window=false: Qwen's sliding_window and max_window_layers are present but not in use
    assert sliding_window(Qwen2Config(num_hidden_layers=4, sliding_window=32, max_window_layers=2).to_dict()) is None
    assert sliding_window(Qwen2MoeConfig(num_hidden_layers=4, sliding_window=32).to_dict()) is None
    used = Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=32, max_window_layers=2)
    assert used.layer_types[2:] == ["sliding_attention"] * 2 and sliding_window(used.to_dict()) == 32
    # Mistral applies its window whenever it is shorter than the positions it takes
    assert sliding_window(MistralConfig(sliding_window=64, max_position_embeddings=128).to_dict()) == 64
    assert sliding_window(MistralConfig(sliding_window=128, max_position_embeddings=128).to_dict()) is None
