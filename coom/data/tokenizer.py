"""Byte-level BPE tokenizers from Hugging Face ``tokenizers``.

Byte-level pre-tokenisation maps every UTF-8 byte to a symbol before merges
are learnt, so any text in any script decodes back to exactly the bytes it
came from: there is no unknown token and no normaliser.

``Tokenizer`` also offers what Megatron-Core's ``GPTDataset`` asks of a
tokenizer (``vocab_size``, ``eod``, ``unique_identifiers``).

The end-of-document token that follows each document is found as
Megatron's tools/preprocess_data.py finds it for a Hugging Face
tokenizer: the ``eos_token`` of the ``tokenizer_config.json`` beside the
``tokenizer.json``. ``data.eod_token`` names it where that file is absent
or says otherwise; COOM's own BPE uses ``<|endoftext|>``.
"""
import hashlib
import json
import sys
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from coom.errors import UserError

END_OF_DOCUMENT = "<|endoftext|>"
TOKENIZER_CONFIG = "tokenizer_config.json"


def declared_eos_token(path: Path) -> str | None:
    """The eos_token that the tokenizer_config.json beside the
    tokenizer.json at path declares, if any."""
    config = path.with_name(TOKENIZER_CONFIG)
    if not config.is_file():
        return None
    try:
        settings = json.loads(config.read_text(encoding="utf-8"))
    except ValueError as error:
        raise UserError(f"{config} is not valid JSON ({error})") from None
    token = settings.get("eos_token") if isinstance(settings, dict) else None
    # Older tokenizer_config.json files store it as a serialised AddedToken.
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


class Tokenizer:
    """A tokenizer.json with an end-of-document token.

    Args:
        path: the tokenizer.json file.
        eod_token: the token that ends each document; None takes the
            eos_token of tokenizer_config.json beside path, else
            ``<|endoftext|>``.
    """

    def __init__(self, path: Path, eod_token: str | None = None):
        self.path = Path(path)
        try:
            self.hf = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as error:
            raise UserError(f"cannot load tokenizer {self.path}: "
                            f"{str(error).splitlines()[0]}") from None
        self.eod_token = (eod_token or declared_eos_token(self.path)
                          or END_OF_DOCUMENT)
        eod = self.hf.token_to_id(self.eod_token)
        if eod is None:
            raise UserError(f"tokenizer {self.path} has no "
                            f"'{self.eod_token}' token to end documents; "
                            "set data.eod_token to its end-of-document "
                            "token")
        self.eod = eod
        self.fingerprint = hashlib.sha256(
            self.path.read_bytes()).hexdigest()[:16]

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    @property
    def unique_identifiers(self) -> OrderedDict:
        """Identity of the tokenizer for Megatron's dataset cache keys."""
        return OrderedDict(cls="coom.Tokenizer", sha256=self.fingerprint)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)


def train_bpe(documents: Iterable[str], vocab_size: int, path: Path,
              eod_token: str = END_OF_DOCUMENT,
              count: int | None = None) -> Tokenizer:
    """Train a byte-level BPE on documents, with eod_token as its one
    special token, and save it to path. count, the number of documents
    where known, gives the progress bars a total."""
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[eod_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        # The bars draw on a terminal's stderr; elsewhere they leave only
        # blank lines on stdout.
        show_progress=sys.stderr.isatty())
    hf.train_from_iterator(documents, trainer, length=count)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    hf.save(str(temporary))
    temporary.replace(path)
    return Tokenizer(path, eod_token)
