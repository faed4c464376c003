"""Language identification of documents when they are prepared, for
sources whose data.languages entry is 'identify'.

The identifier is py3langid, a maintained fork of langid.py: a naive
Bayes model over byte n-grams of 97 languages that ships inside the
package, so nothing is downloaded. It is an optional dependency
(``pip install 'py3langid>=0.4'``). Each document gets the most likely of
the candidate languages: every one the model knows, or those listed
after the entry ('identify:en+de+sw'), which is faster and more accurate
where the languages are known. Worker processes label a source's
documents once; the labels are cached, one code a line, under the key
of the source's files and the candidates.
"""
import functools
import hashlib
import multiprocessing
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from coom.data.languages import checked_language
from coom.errors import UserError

IDENTIFY = "identify"
"""The data.languages entry of sources whose documents' languages are
identified."""

DOCUMENTS_PER_TASK = 256


def _model():
    try:
        from py3langid import langid
    except ImportError:
        raise UserError(
            f"data.languages: '{IDENTIFY}' needs the optional language "
            "identifier py3langid; install it with pip install "
            "'py3langid>=0.4'") from None
    return langid


def candidates(entry: str) -> Optional[tuple[str, ...]]:
    """The ISO 639 codes listed in an 'identify:CODES' entry (None for
    every language the identifier knows), checked in one line."""
    listed = entry.removeprefix(IDENTIFY).removeprefix(":")
    if not listed:
        return None
    return tuple(sorted({checked_language(code.strip())
                         for code in listed.split("+")}))


def _check_known(codes: Optional[tuple[str, ...]]) -> None:
    """Refuse in one line candidates the identifier does not know."""
    known = set(_identifier(None).labels)
    unknown = [code for code in codes or () if code not in known]
    if unknown:
        raise UserError(
            f"data.languages: the identifier does not know "
            f"{', '.join(unknown)}; it knows {', '.join(sorted(known))}")


@functools.lru_cache(maxsize=2)
def _identifier(codes: Optional[tuple[str, ...]]):
    langid = _model()
    identifier = langid.LanguageIdentifier.from_model_file(langid.MODEL_FILE)
    if codes is not None:
        identifier.set_languages(list(codes))
    return identifier


def _label(codes: Optional[tuple[str, ...]],
           documents: list[str]) -> list[str]:
    """Worker task: each document's most likely language."""
    identifier = _identifier(codes)
    return [checked_language(identifier.classify(document)[0])
            for document in documents]


def _batches(documents: Iterator[str]) -> Iterator[list[str]]:
    batch = []
    for document in documents:
        batch.append(document)
        if len(batch) == DOCUMENTS_PER_TASK:
            yield batch
            batch = []
    if batch:
        yield batch


def identified(name: str, documents: Iterator[str], key: str,
               codes: Optional[tuple[str, ...]], cache: Path,
               workers: int) -> Path:
    """The cached labels of documents (one language code a line), made
    by workers processes if new; key names the documents' source."""
    digest = hashlib.sha256(f"{key}|{codes}".encode()).hexdigest()[:16]
    path = cache / "languages" / f"{name}-{digest}.txt"
    if path.is_file():
        return path
    _check_known(codes)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers) as pool, \
            open(temporary, "w", encoding="utf-8") as out, \
            tqdm(desc=f"identifying languages of {name}", unit="doc",
                 leave=False) as bar:
        for labels in pool.imap(functools.partial(_label, codes),
                                _batches(documents)):
            out.write("".join(label + "\n" for label in labels))
            bar.update(len(labels))
    temporary.rename(path)
    return path
