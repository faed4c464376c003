"""Byte-level BPE tokenizers from Hugging Face ``tokenizers``.

Byte-level pre-tokenisation maps every UTF-8 byte to a symbol before merges
are learnt, so any text in any script decodes back to exactly the bytes it
came from: there is no unknown token and no normaliser.

``Tokenizer`` also offers what Megatron-Core's ``GPTDataset`` asks of a
tokenizer (``vocab_size``, ``eod``, ``unique_identifiers``).
"""
import hashlib
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from coom.errors import UserError

END_OF_DOCUMENT = "<|endoftext|>"


class Tokenizer:
    """A tokenizer.json with an end-of-document token.

    Args:
        path: the tokenizer.json file.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.hf = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as error:
            raise UserError(f"cannot load tokenizer {self.path}: "
                            f"{str(error).splitlines()[0]}") from None
        eod = self.hf.token_to_id(END_OF_DOCUMENT)
        if eod is None:
            raise UserError(f"tokenizer {self.path} has no "
                            f"'{END_OF_DOCUMENT}' token to end documents")
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


def train_bpe(documents: Iterable[str], vocab_size: int,
              path: Path) -> Tokenizer:
    """Train a byte-level BPE on documents and save it to path."""
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[END_OF_DOCUMENT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True)
    hf.train_from_iterator(documents, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    hf.save(str(temporary))
    temporary.replace(path)
    return Tokenizer(path)
