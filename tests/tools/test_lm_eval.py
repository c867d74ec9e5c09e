"""keel as an lm-evaluation-harness model (pretrain/downstream.py) and `tools/evaluate.py --tasks`, on tiny
models and tasks built here (no network): log-likelihoods equal keel's own forward, generation equals
step-by-step argmax decoding, and lm-eval's own Hugging Face backend scores an exported folder the same."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.helpers import build_tiny_gpt
from tests.hf_helpers import keel_logits, llama_config, tiny_llama
from tests.hf_helpers import tiny_tokenizer as hf_tokenizer
from tests.lm_eval_helpers import GENERATION, TEXTS, choice_requests, write_tasks

pytest.importorskip("lm_eval", reason="the eval extra (tools/setup.sh installs it)")

from lm_eval.api.instance import Instance  # noqa: E402

RTOL = 1e-5  # fp32


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def sp_model(megatron_world, tiny_tokenizer):
    """A keel GPT (64 positions) with keel's sentencepiece tokenizer, which adds no BOS."""
    _, gpt = build_tiny_gpt(["model.init_std=0.2"], vocab_size=tiny_tokenizer.vocab_size)
    return gpt, tiny_tokenizer


def _lm(model, **kwargs):
    from pretrain.downstream import KeelLM

    return KeelLM(*model, max_length=64, batch_size=3, **kwargs)


def _logprobs(gpt, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(keel_logits(gpt, torch.tensor([ids]))[0].float(), -1)


def _score(gpt, ids: list[int], first: int) -> tuple[float, bool]:
    """keel's forward over `ids`: log p of ids[first:] and whether each is the argmax."""
    lp = _logprobs(gpt, ids)
    return (sum(float(lp[i - 1, ids[i]]) for i in range(first, len(ids))),
            all(int(lp[i - 1].argmax()) == ids[i] for i in range(first, len(ids))))


def test_loglikelihoods_equal_keels_own_forward(sp_model):
    gpt, tok = sp_model
    lm = _lm(sp_model)
    assert lm.prefix_token_id == tok.eod  # no BOS: a text follows EOD, as in keel's packed data
    requests = choice_requests()
    got = lm.loglikelihood(requests)
    for (context, continuation), (logprob, greedy) in zip((r.args for r in requests), got):
        head = tok.encode(context) if context else [tok.eod]
        whole = tok.encode(context + continuation) if context else [tok.eod] + tok.encode(continuation)
        expected, expected_greedy = _score(gpt, whole, len(head))
        assert logprob == pytest.approx(expected, rel=RTOL) and greedy == expected_greedy
    assert len({round(lp, 3) for lp, _ in got}) > len(got) // 2  # distinct scores: a real model's

    # rolling: disjoint windows of 64 predicted tokens, each read from the 64 tokens before its end (the
    # first after EOD; the last, shorter, window re-reads tokens the previous one predicted)
    text = TEXTS[0]["text"]
    ids = tok.encode(text)
    assert len(ids) > 2 * 64 and len(ids) % 64
    stream, expected = [tok.eod] + ids, 0.0
    for start in range(0, len(ids), 64):
        end = min(start + 64, len(ids))
        window = stream[max(0, end - 64):end + 1]
        expected += _score(gpt, window, len(window) - (end - start))[0]
    [rolling] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert rolling == pytest.approx(expected, rel=RTOL)


def test_generation_equals_argmax_decoding_and_sampling_follows_the_seed(sp_model):
    gpt, tok = sp_model
    settings = {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}
    requests = [Instance("generate_until", {}, (d["prompt"], settings), i) for i, d in enumerate(GENERATION)]
    got = _lm(sp_model).generate_until(requests)
    for d, text in zip(GENERATION, got):
        ids = tok.encode(d["prompt"])
        new = []
        for _ in range(6):  # no cache: the whole sequence each step
            new.append(int(_logprobs(gpt, ids + new)[-1].argmax()))
        new = new[:new.index(tok.eod)] if tok.eod in new else new
        assert text == tok.decode(new).split("\n")[0]
    assert any(got)

    sampled = {"until": [], "max_gen_toks": 6, "do_sample": True, "temperature": 1.0}
    requests = [Instance("generate_until", {}, (d["prompt"], sampled), i) for i, d in enumerate(GENERATION)]
    runs = [_lm(sp_model, seed=seed).generate_until(requests) for seed in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2]


def test_unsupported_generation_settings_are_one_line(sp_model):
    from models.config import ConfigError

    lm = _lm(sp_model)
    request = Instance("generate_until", {}, ("x", {"until": [], "top_p": 0.9, "do_sample": True}), 0)
    with pytest.raises(ConfigError, match=r"^generation settings \['top_p'\] are not supported.*generation_kwargs$"):
        lm.generate_until([request])


# ---- against lm-eval's own Hugging Face backend, on a keel checkpoint and its export ------------------

@pytest.fixture(scope="module")
def keel_and_hf(tmp_path_factory, megatron_world):
    """A keel checkpoint (a tiny Llama imported, with its Hugging Face tokenizer, which adds BOS) and the
    folder tools/export_hf.py writes from it."""
    from tools.export_hf import export_model
    from tools.import_hf import import_model

    root = tmp_path_factory.mktemp("lm_eval")
    llama = tiny_llama(root / "llama", hf_tokenizer(root / "tok"), llama_config())
    keel = import_model(llama, root / "keel")
    return keel, export_model(keel, root / "exported")


@pytest.fixture(scope="module")
def keel_results(keel_and_hf, tasks):
    from pretrain.downstream import KeelLM, run_tasks
    from tools.generate import load_model

    loaded = load_model(str(keel_and_hf[0]))
    lm = KeelLM(loaded.gpt, loaded.tokenizer, loaded.cfg.model.max_seq_len, batch_size=4)
    return lm, run_tasks(lm, [str(p) for p in tasks.values()], bootstrap_iters=0, log_samples=True)


def _close(a, b) -> bool:
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5)
    return a == b


def test_keel_adapter_scores_as_lm_evals_hf_backend_on_the_export(keel_and_hf, keel_results, tasks):
    from lm_eval.models.huggingface import HFLM

    from pretrain.downstream import run_tasks

    lm, keel = keel_results
    hf_lm = HFLM(pretrained=str(keel_and_hf[1]), device="cpu", batch_size=4, dtype="float32")
    assert lm.prefix_token_id == hf_lm.prefix_token_id == 0 and lm.max_length == hf_lm.max_length == 128
    hf = run_tasks(hf_lm, [str(p) for p in tasks.values()], bootstrap_iters=0, log_samples=True)
    # every request's response (log-likelihoods, greedy flags, generated text), then every metric
    for task in ("keel_mc", "keel_gen", "keel_rolling"):
        ours, theirs = keel.results["samples"][task], hf.results["samples"][task]
        assert len(ours) == len(theirs) > 0
        for a, b in zip(ours, theirs):
            assert _close(a["filtered_resps"], b["filtered_resps"]), (task, a["filtered_resps"], b["filtered_resps"])
    ours, theirs = keel.metrics(), hf.metrics()
    assert set(ours) == set(theirs)
    assert {"keel_mc/acc", "keel_gen/exact_match", "keel_rolling/bits_per_byte"} <= set(ours)
    assert all(math.isclose(ours[k], theirs[k], rel_tol=1e-5, abs_tol=1e-6) for k in ours), (ours, theirs)
    texts = [s["filtered_resps"][0] for s in keel.results["samples"]["keel_gen"]]
    assert any(texts) and not any("\n" in t for t in texts)  # generated, and cut at the stop string


def test_evaluate_cli_prints_lm_evals_results(keel_and_hf, keel_results, tasks, capsys):
    from tools.evaluate import main

    assert main(["--checkpoint", str(keel_and_hf[0]), "--tasks", f"{tasks['mc']},{tasks['gen']}", "--json",
                 "--bootstrap-iters", "0"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = keel_results[1].results["results"]
    assert set(printed["results"]) == {"keel_mc", "keel_gen"}
    assert printed["results"]["keel_mc"]["acc,none"] == expected["keel_mc"]["acc,none"]
    assert printed["results"]["keel_gen"]["exact_match,none"] == expected["keel_gen"]["exact_match,none"]


@pytest.mark.parametrize("args, message", [
    (["--tasks", "missing.yaml"], r"task file missing.yaml not found; pass an lm-eval task name or the path"),
    (["--tasks", "x.yaml", "--checkpoint-is-hf"], r"is not a keel run or checkpoint .*lm_eval --model hf"),
    (["--tasks", "x.yaml", "--tp", "2"], r"this process group runs TP=1, PP=1, not the TP=2, PP=1 asked for"),
])
def test_cli_bad_inputs_are_one_line(keel_and_hf, tmp_path, capsys, args, message):
    import re

    from tools.evaluate import main

    checkpoint = keel_and_hf[1] if "--checkpoint-is-hf" in args else keel_and_hf[0]
    assert main(["--checkpoint", str(checkpoint), *[a for a in args if a != "--checkpoint-is-hf"]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err


def test_a_missing_extra_names_its_install_command():
    from models.config import ConfigError
    from pretrain.errors import require_extra

    with pytest.raises(ConfigError, match=r"^no_such_module_35 is not installed .*pip install -e '\.\[eval\]'$"):
        require_extra("no_such_module_35", "eval")
