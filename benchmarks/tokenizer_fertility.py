"""Fertility per language of a tokenizer trained on language-balanced
text against one trained on the text as it comes, same vocabulary.

Writes the machine's translated program messages
(``coom.data.locale_sample``: every language with at least 200 strings,
all of each, so as unbalanced as the translations are) and prepares
them twice, unbalanced (data.tokenizer_alpha 1, data.tokenizer_floor 0)
and balanced by the given alpha and floor, and prints each language's
fertility under both:
tokens per byte and per whitespace word. The worst language is the one
with the most tokens per byte unbalanced, the best the one with the
fewest; issue 29's target: the worst improves by at least 20%, the best
worsens by at most 5%.

Runs on a CPU, from the repository root:

    python3 benchmarks/tokenizer_fertility.py --vocab 8192 --floor 0.6
"""
import argparse
import tempfile
from pathlib import Path

from coom.config import load_config
from coom.data.languages import LanguageStatistics
from coom.data.locale_sample import write_sample
from coom.data.prepare import prepare


def fertility(sample: Path, cache: str, vocab: int, alpha: float,
              floor: float) -> dict[str, LanguageStatistics]:
    """Each language's statistics, with a tokenizer trained on text
    balanced by alpha and floor."""
    config = load_config("tiny-multilingual", [
        f"data.paths=[{sample}]", "data.languages=[field:lang]",
        f"data.cache_dir={cache}", f"data.tokenizer_vocab_size={vocab}",
        f"data.tokenizer_alpha={alpha}", f"data.tokenizer_floor={floor}"])
    return prepare(config.data).statistics


def _per_word(language: str, figures: LanguageStatistics) -> str:
    value = figures.tokens_per_word(language)
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--floor", type=float, default=0.6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        sample = Path(folder) / "sample"
        documents = write_sample(sample, min_docs=200)
        print(f"{len(documents)} languages, {sum(documents.values()):,} "
              f"documents, {max(documents.values()):,} to "
              f"{min(documents.values()):,} per language", flush=True)
        cache = str(Path(folder) / "cache")
        unbalanced = fertility(sample, cache, args.vocab, 1.0, 0.0)
        balanced = fertility(sample, cache, args.vocab, args.alpha,
                             args.floor)
    print("language documents  tokens/byte: unbalanced, balanced, change  "
          "tokens/word: unbalanced, balanced")
    per_byte = {language: figures.tokens_per_byte
                for language, figures in unbalanced.items()}
    for language in sorted(per_byte, key=per_byte.get):
        before, after = unbalanced[language], balanced[language]
        change = after.tokens_per_byte / before.tokens_per_byte - 1
        print(f"{language:>8} {before.documents:9,}  "
              f"{before.tokens_per_byte:.4f} {after.tokens_per_byte:.4f} "
              f"{change:+7.1%}  {_per_word(language, before)} "
              f"{_per_word(language, after)}")
    for label, language in (("worst", max(per_byte, key=per_byte.get)),
                            ("best", min(per_byte, key=per_byte.get))):
        before = unbalanced[language].tokens_per_byte
        after = balanced[language].tokens_per_byte
        print(f"{label} language {language}: {before:.4f} -> {after:.4f} "
              f"tokens/byte ({after / before - 1:+.1%})")


if __name__ == "__main__":
    main()
