"""Translated text in many languages, read from the machine's gettext
catalogs.

Linux machines carry the translations of their programs' messages as
gettext catalogs, ``/usr/share/locale/LANG/LC_MESSAGES/DOMAIN.mo``: the
errors, prompts and ``--help`` paragraphs of coreutils, bash, git and the
rest, in up to two hundred languages. That is real text that nobody in
COOM wrote and that needs no download, so multilingual features can be
tried and tested on any machine.

Each catalog maps an English msgid to its translation. The translations
become the sample of their language, and the msgids themselves the sample
of English. Header entries, untranslated entries and strings shorter than
``min_chars`` (menu labels, single words) are left out, and every string is
kept once per language. The text is small and repetitive next to a real
corpus, and technical: it is for trying things, not for training a model
that is meant to be good.
"""
import gettext
import json
import os
import re
import struct
import warnings
from pathlib import Path
from typing import Optional

from coom.data.languages import base_language
from coom.errors import Skipped, UserError

DEFAULT_ROOT = Path("/usr/share/locale")
ENGLISH = "en"
MIN_CHARS = 20
MIN_DOCS = 50
INSTALL_HINT = ("install some language packs (e.g. the `locales` or "
                "`*-l10n` packages) or give your own multilingual .jsonl "
                "sources")

# What GNUTranslations raises on a damaged or mislabelled catalog: a bad
# magic number or version (OSError), text not in the declared charset
# (UnicodeDecodeError), an unknown charset (LookupError), a bad plural
# formula (ValueError) and truncated tables (struct.error, IndexError).
UNREADABLE_CATALOG = (OSError, ValueError, LookupError, IndexError,
                      struct.error)

# English in other dress: the msgids with other quote marks (en@quot,
# en@boldquot, with terminal escapes) or in the Shavian alphabet (en@shaw).
SKIPPED_FOLDER = re.compile(r"en@")


def _catalog_paths(root: Path) -> list[Path]:
    """The message catalogs under root, folder by folder in sorted order
    and sorted within each folder."""
    if not root.is_dir():
        raise UserError(f"no gettext catalogs under {root}: the folder does "
                        f"not exist; {INSTALL_HINT}")
    return sorted(root.glob("*/LC_MESSAGES/*.mo"),
                  key=lambda path: (path.parent.parent.name, path.name))


def _read_catalog(path: Path) -> dict | None:
    """A catalog's entries, msgid to msgstr (plural forms under
    ``(msgid, n)``), or None when the file cannot be read."""
    try:
        with open(path, "rb") as file:
            return gettext.GNUTranslations(file)._catalog
    except UNREADABLE_CATALOG:
        return None


def _is_translated(catalog: dict, key: str | tuple, text: str) -> bool:
    """Whether an entry differs from its English msgid. A plural entry
    whose first form is the msgid is untranslated in all its forms: the
    others are the English plural, which the catalog does not keep."""
    if isinstance(key, tuple):
        msgid = key[0]
        return catalog[(msgid, 0)] != msgid
    return text != key


def _keep(strings: dict[str, None], text: str, min_chars: int) -> None:
    """Add text to an ordered set of strings if it is long enough; the
    length leaves out surrounding whitespace."""
    length = len(text.strip())
    if length and length >= min_chars:
        strings.setdefault(text, None)


def _collect(catalogs: list[Path], min_chars: int, merge_regions: bool
             ) -> tuple[dict[str, dict[str, None]], list[Path]]:
    """The strings of every language, English from the msgids, as ordered
    sets; and the catalogs that could not be read."""
    by_language: dict[str, dict[str, None]] = {}
    english: dict[str, None] = {}
    unreadable = []
    for path in catalogs:
        catalog = _read_catalog(path)
        if catalog is None:
            unreadable.append(path)
            continue
        folder = path.parent.parent.name
        if SKIPPED_FOLDER.match(folder):
            continue
        language = base_language(folder) if merge_regions else folder
        strings = by_language.setdefault(language, {})
        for key, text in catalog.items():
            msgid = key[0] if isinstance(key, tuple) else key
            if not msgid:
                continue
            _keep(english, msgid, min_chars)
            if _is_translated(catalog, key, text):
                _keep(strings, text, min_chars)
    by_language[ENGLISH] = english | by_language.get(ENGLISH, {})
    return by_language, unreadable


def translated_texts(root: Path = DEFAULT_ROOT, min_chars: int = MIN_CHARS,
                     merge_regions: bool = True) -> dict[str, list[str]]:
    """The translated strings of every language under root, by language.

    A language is a folder name (``de``, ``pt_BR``, ``sr@latin``), or its
    ISO 639 code when ``merge_regions`` puts regional variants together, in
    sorted folder order. English holds the msgids of all catalogs, then
    the strings of the ``en`` folder (and, merged, of ``en_GB`` and the
    like; the ``en@`` folders, English with other quote marks or in the
    Shavian alphabet, are left out). Each language's strings appear once,
    in the order of first appearance; languages come in sorted order.
    Unreadable catalogs are skipped with a warning that counts them.
    """
    by_language, unreadable = _collect(_catalog_paths(root), min_chars,
                                       merge_regions)
    if unreadable:
        warnings.warn(f"skipped {len(unreadable)} unreadable gettext "
                      f"catalogs under {root}, such as {unreadable[0]}",
                      Skipped, stacklevel=2)
    texts = {language: list(strings)
             for language, strings in sorted(by_language.items())
             if strings}
    if not texts:
        raise UserError(f"no gettext catalogs with translated text under "
                        f"{root}; {INSTALL_HINT}")
    return texts


def _write_documents(path: Path, language: str, strings: list[str]) -> None:
    """Write one JSON line per string, replacing path all at once."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8", newline="\n") as file:
            for text in strings:
                record = {"text": text, "lang": language}
                file.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_sample(folder: Path, root: Path = DEFAULT_ROOT,
                 min_docs: int = MIN_DOCS,
                 max_docs: Optional[int] = None) -> dict[str, int]:
    """Write ``folder/LANG.jsonl`` for every language under root with at
    least ``min_docs`` strings, one document per string, each language's
    first ``max_docs`` where given; return how many documents each file
    holds."""
    texts = translated_texts(root)
    kept = {language: strings[:max_docs]
            for language, strings in texts.items()
            if len(strings) >= min_docs}
    if not kept:
        most = max(texts, key=lambda language: len(texts[language]))
        raise UserError(f"no language under {root} has {min_docs} "
                        f"translated strings (the most is {most}, with "
                        f"{len(texts[most])}); lower min_docs or "
                        f"{INSTALL_HINT}")
    folder.mkdir(parents=True, exist_ok=True)
    for language, strings in kept.items():
        _write_documents(folder / f"{language}.jsonl", language, strings)
    return {language: len(strings) for language, strings in kept.items()}
