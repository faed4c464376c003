import json
import os
import subprocess
import sys

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


@pytest.fixture(scope="module")
def llama_style(tmp_path_factory):
    """A tokenizer.json whose end token is </s>, named by the
    tokenizer_config.json beside it, as Hugging Face models ship them."""
    folder = tmp_path_factory.mktemp("llama")
    train_bpe(MULTILINGUAL, 300, folder / "tokenizer.json", "</s>")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "</s>", "special": True}}))
    return folder / "tokenizer.json"


def test_end_of_document_is_the_declared_eos_token(llama_style):
    tokenizer = Tokenizer(llama_style)
    assert tokenizer.eod_token == "</s>"
    assert tokenizer.hf.id_to_token(tokenizer.eod) == "</s>"


def test_data_eod_token_overrides_the_declared_one(llama_style, tokenizer):
    path = tokenizer.path.with_name("tokenizer_config.json")
    path.write_text(json.dumps({"eos_token": "<eos>"}))
    try:
        named = Tokenizer(tokenizer.path, END_OF_DOCUMENT)
        with pytest.raises(UserError, match="no '<eos>' token.*"
                           "set data.eod_token"):
            Tokenizer(tokenizer.path)
    finally:
        path.unlink()
    assert named.hf.id_to_token(named.eod) == END_OF_DOCUMENT
    with pytest.raises(UserError, match="no '<|endoftext|>' token"):
        Tokenizer(llama_style, END_OF_DOCUMENT)


def test_broken_tokenizer_config_is_refused(tmp_path, tokenizer):
    (tmp_path / "tokenizer.json").write_bytes(tokenizer.path.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("{ not json")
    with pytest.raises(UserError, match="tokenizer_config.json is not "
                       "valid JSON"):
        Tokenizer(tmp_path / "tokenizer.json")


def test_training_off_a_terminal_prints_nothing(tmp_path, capfd):
    """tokenizers' bars leave blank lines on stdout when not drawn."""
    train_bpe(MULTILINGUAL, 300, tmp_path / "tokenizer.json")
    assert capfd.readouterr() == ("", "")


def test_training_on_a_terminal_shows_progress(tmp_path):
    script = ("import sys; from pathlib import Path; "
              "from coom.data.tokenizer import train_bpe; "
              "train_bpe(['some text'] * 50, 300, "
              "Path(sys.argv[1]), count=50)")
    leader, follower = os.openpty()
    child = subprocess.Popen([sys.executable, "-c", script,
                              str(tmp_path / "tokenizer.json")],
                             stderr=follower)
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 1 << 16)
        except OSError:  # how Linux ends a closed terminal's output
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert child.wait() == 0
    text = shown.decode(errors="replace")
    assert "Pre-processing sequences" in text
    assert "Compute merges" in text
    # The known count of documents gives the first bar its total.
    assert "/       50" in text
