"""keel's sentencepiece tokenizers: the fingerprint that keeps packed data with its tokenizer."""

from __future__ import annotations

from data.corpus import stdlib_files
from data.tokenizer import SentencePieceTokenizer, train_tokenizer


def test_two_trainings_of_one_model_share_a_fingerprint_and_another_model_does_not(tmp_path):
    texts = [p.read_text(errors="replace") for p in stdlib_files("code")[:15]]
    a = SentencePieceTokenizer(train_tokenizer(texts, tmp_path / "a" / "tok.model", 400))
    b = SentencePieceTokenizer(train_tokenizer(texts, tmp_path / "b" / "renamed.model", 400))
    # the files differ (the trainer writes its temporary output prefix into them), the models do not
    assert a.path.read_bytes() != b.path.read_bytes()
    assert a.encode(texts[0][:2000]) == b.encode(texts[0][:2000])
    assert a.fingerprint() == b.fingerprint()
    other = SentencePieceTokenizer(train_tokenizer(texts, tmp_path / "c" / "tok.model", 420))
    assert other.fingerprint() != a.fingerprint()
