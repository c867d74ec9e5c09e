"""Hugging Face tokenizers beside keel's sentencepiece models: loading (folder or tokenizer.json), BOS/EOS
from the tokenizer's own config, packing, and the fingerprint that keeps packed data with its tokenizer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from data.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer
from tests.helpers import ROOT
from tests.hf_helpers import VOCAB, tiny_tokenizer


@pytest.fixture(scope="module")
def hf_tok_dir(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("hf_tok"))


def test_a_folder_and_its_tokenizer_json_load_the_same_tokenizer(hf_tok_dir, tiny_tokenizer):
    folder, file = load_tokenizer(hf_tok_dir), load_tokenizer(hf_tok_dir / "tokenizer.json")
    assert isinstance(folder, HFTokenizer) and isinstance(load_tokenizer(tiny_tokenizer.path), SentencePieceTokenizer)
    assert (folder.vocab_size, folder.bos, folder.eod, folder.pad) == (VOCAB, 0, 1, 2)
    assert folder.fingerprint() == file.fingerprint() != tiny_tokenizer.fingerprint()
    # the tokenizer's template puts BOS first; keel appends EOD itself; an empty document stays empty
    ids = folder.encode_batch(["def f(x):\n    return x\n", ""])
    assert ids[0][0] == 0 and 1 not in ids[0] and ids[1] == []
    assert folder.decode(ids[0][1:]) == "def f(x):\n    return x\n"


def test_a_copy_elsewhere_keeps_the_fingerprint_and_another_tokenizer_does_not(hf_tok_dir, tmp_path):
    tok = load_tokenizer(hf_tok_dir)
    assert load_tokenizer(tok.save(tmp_path / "copy")).fingerprint() == tok.fingerprint()
    config = json.loads((hf_tok_dir / "tokenizer_config.json").read_text())
    other = tmp_path / "other"
    shutil.copytree(hf_tok_dir, other)
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<pad>"}))
    assert load_tokenizer(other).fingerprint() != tok.fingerprint()


def test_bad_tokenizer_paths_are_one_line(tmp_path, hf_tok_dir):
    with pytest.raises(FileNotFoundError, match="tokenizer .* not found; pass a sentencepiece .model"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not a Hugging Face tokenizer") as e:
        load_tokenizer(tmp_path / "empty")
    assert "\n" not in str(e.value)
    bare = shutil.copy(hf_tok_dir / "tokenizer.json", tmp_path / "bare.json")  # no tokenizer_config.json beside it
    with pytest.raises(ValueError, match="names no end-of-text token.*pass the model folder"):
        load_tokenizer(bare)


def test_pack_with_a_hf_tokenizer_records_it_and_training_refuses_another(hf_tok_dir, tiny_tokenizer, tmp_path):
    from data.config import DataConfig
    from data.format import PackedDataset
    from data.prepare import open_checked

    from data.corpus import stdlib_documents

    corpus, out = tmp_path / "corpus.jsonl", tmp_path / "packed"
    corpus.write_text("".join(json.dumps({"text": d.text[:4000]}) + "\n"
                              for _, d in zip(range(12), stdlib_documents("code", "val"))))
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "pack.py"), "--input", str(corpus),
                           "--tokenizer", str(hf_tok_dir), "--seq-len", "64", "--method", "concat",
                           "--output", str(out), "--no-progress"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    ds = PackedDataset(out)
    tok = load_tokenizer(hf_tok_dir)
    assert ds.meta["tokenizer"]["kind"] == "huggingface" and ds.meta["tokenizer"]["sha256_16"] == tok.fingerprint()
    # every document starts with BOS, as the tokenizer says, right after the previous one's EOD
    starts = [(r.tokens, s) for r in map(ds.row, range(len(ds))) for s in r.doc_starts if s > 0]
    assert starts and all(t[s] == tok.bos and t[s - 1] == tok.eod for t, s in starts)
    cfg = DataConfig(seq_len=64, path=str(out))
    assert len(open_checked(str(out), cfg, tok, "training")) == len(ds)
    # a tokenizer with the same vocabulary size but other ids: refused in one line
    other = tmp_path / "other"
    shutil.copytree(hf_tok_dir, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<pad>"}))
    with pytest.raises(ValueError, match="was packed with another tokenizer .* than .*other") as e:
        open_checked(str(out), cfg, load_tokenizer(other), "training")
    assert "\n" not in str(e.value)
