"""Language codes: which a source may be tagged with, and their names.

A language is named by its ISO 639 code: two letters where ISO 639-1 has
one (en, de, zh), else three (ISO 639-2 or -3: ast, yue, ckb). A tag may
carry a region or script after it (pt_BR, sr@latin, zh-Hant): the
language is the code before it. The codes and reference names ship with
COOM (``iso639.tsv``), so no network is needed to check them.
"""
import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from coom.errors import UserError

TAG_SUFFIX = re.compile(r"[-_.@]")
"""Where a tag's region, script or encoding starts."""

UNSPACED = frozenset({"bo", "dz", "ja", "km", "lo", "my", "th", "yue",
                      "zh"})
"""Languages whose writing puts no spaces between words (Chinese,
Japanese, Thai, Lao, Khmer, Burmese, Tibetan, Dzongkha): they have no
whitespace words to count fertility by."""


@functools.lru_cache(maxsize=1)
def _names() -> dict[str, str]:
    lines = (Path(__file__).parent / "iso639.tsv").read_text(
        encoding="utf-8").splitlines()
    return dict(line.split("\t") for line in lines
                if line and not line.startswith("#"))


def base_language(tag: str) -> str:
    """The language code of a tag: pt_BR, sr@latin and zh-Hant give pt,
    sr and zh."""
    return TAG_SUFFIX.split(tag, maxsplit=1)[0].lower()


def language_name(code: str) -> str:
    """code's reference name (English); refuses in one line a code that
    ISO 639 does not know."""
    name = _names().get(code)
    if name is None:
        raise UserError(f"unknown language code '{code}': expected an ISO "
                        "639 code such as en, de, zh or yue")
    return name


@dataclass
class LanguageStatistics:
    """What a language's documents held, as prepared: documents, UTF-8
    bytes, tokens (without the end-of-document ones) and whitespace
    words."""

    documents: int = 0
    bytes: int = 0
    tokens: int = 0
    words: int = 0

    def add(self, other: "LanguageStatistics") -> None:
        for name in ("documents", "bytes", "tokens", "words"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def tokens_per_byte(self) -> float:
        """Fertility per byte, comparable across scripts."""
        return self.tokens / self.bytes if self.bytes else 0.0

    def tokens_per_word(self, language: str) -> Optional[float]:
        """Fertility per whitespace word; None for a language written
        without spaces between words (UNSPACED)."""
        if not self.words or language in UNSPACED:
            return None
        return self.tokens / self.words


def document_statistics(text: str, tokens: int) -> LanguageStatistics:
    """One document's statistics."""
    return LanguageStatistics(1, len(text.encode("utf-8")), tokens,
                              len(text.split()))


def checked_language(tag: str) -> str:
    """The language code of tag (pt_BR gives pt), refused in one line if
    ISO 639 does not know it."""
    code = base_language(tag)
    language_name(code)
    return code


def describe_statistics(statistics: dict[str, LanguageStatistics]) -> str:
    """Each language's statistics as lines of text, the most tokens
    first: fertility is tokens per byte, and per whitespace word where
    the writing separates words."""
    lines = ["language documents bytes tokens tokens/byte tokens/word"]
    for language, figures in sorted(statistics.items(),
                                    key=lambda item: -item[1].tokens):
        per_word = figures.tokens_per_word(language)
        lines.append(
            f"  {language:>5} {figures.documents:>9,} {figures.bytes:>13,} "
            f"{figures.tokens:>12,} {figures.tokens_per_byte:>8.3f} "
            f"{'-' if per_word is None else f'{per_word:.2f}':>8}")
    return "\n".join(lines)
