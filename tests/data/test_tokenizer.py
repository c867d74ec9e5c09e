"""keel's sentencepiece tokenizers: the fingerprint that keeps packed data with its tokenizer, and the
cached tokenizer's name."""

from __future__ import annotations

from data.config import DataConfig
from data.corpus import stdlib_files
from data.prepare import tokenizer_path
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


def test_the_cached_tokenizer_is_named_for_the_split_it_was_trained_on(tmp_path):
    # ensure_tokenizer trains on the training side of data.val_percent's split, so each split has its own
    five, ten = DataConfig(cache_dir=str(tmp_path)), DataConfig(cache_dir=str(tmp_path), val_percent=10)
    assert tokenizer_path(five) != tokenizer_path(ten)
    assert tokenizer_path(five).parent == tokenizer_path(ten).parent == tmp_path / "tokenizers"
    assert tokenizer_path(DataConfig(tokenizer=str(tmp_path / "mine.model"))) == tmp_path / "mine.model"
