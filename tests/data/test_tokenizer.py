import pytest

from coom.data.tokenizer import END_OF_DOCUMENT, Tokenizer, train_bpe
from coom.errors import UserError
from tests.conftest import MULTILINGUAL

UNSEEN = [
    "Ελληνικά κείμενα και Кириллица тоже.",
    "ภาษาไทย และ עברית וגם ქართული",
    "\x00\x01 control bytes, a BOM \ufeff and lone combining \u0301",
    "🧬🏳️‍🌈 family 👨‍👩‍👧‍👦",
    "",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    return train_bpe(MULTILINGUAL * 20, 400, path)


@pytest.mark.parametrize("text", MULTILINGUAL + UNSEEN)
def test_any_utf8_text_round_trips_exactly(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < tokenizer.vocab_size for i in ids)


def test_end_of_document_token_is_reserved(tokenizer):
    assert tokenizer.hf.id_to_token(tokenizer.eod) == END_OF_DOCUMENT
    assert tokenizer.encode(END_OF_DOCUMENT) == [tokenizer.eod]
    assert tokenizer.vocab_size == 400


def test_megatron_interface(tokenizer):
    identity = tokenizer.unique_identifiers
    assert identity["sha256"] == tokenizer.fingerprint
    assert len(tokenizer.fingerprint) == 16


def test_reloaded_tokenizer_encodes_identically(tokenizer):
    again = Tokenizer(tokenizer.path)
    assert again.fingerprint == tokenizer.fingerprint
    for text in MULTILINGUAL:
        assert again.encode(text) == tokenizer.encode(text)


def test_tokenizer_without_end_of_document_is_refused(tmp_path):
    import tokenizers
    from tokenizers import models
    hf = tokenizers.Tokenizer(models.BPE())
    path = tmp_path / "plain.json"
    hf.save(str(path))
    with pytest.raises(UserError, match="no '<|endoftext|>' token"):
        Tokenizer(path)


def test_unreadable_tokenizer_is_refused(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("{ not json")
    with pytest.raises(UserError, match="cannot load tokenizer"):
        Tokenizer(path)
