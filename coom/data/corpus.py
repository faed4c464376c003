"""Text sources: the embedded default corpus and users' .txt/.jsonl files.

The default corpus is the Python standard library source of the interpreter
running COOM: real text that every machine has, so the default run needs
no download. Each file is one document.
"""
import hashlib
import json
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from coom.data.languages import checked_language
from coom.errors import UserError

TEXT_SUFFIXES = (".txt", ".jsonl")

# Where a .jsonl line ends: the newlines of Python's text files, which
# Megatron's tools/preprocess_data.py reads. str.splitlines() would also
# break at U+2028, U+2029 and U+0085, which json.dumps(ensure_ascii=False)
# writes raw inside strings.
JSONL_LINE_END = re.compile(r"\r\n|\r|\n")


def default_corpus_files() -> list[Path]:
    """The interpreter's standard-library .py files, in a fixed order.

    The order is that of a hash of each relative path, not the alphabet:
    Megatron splits documents into train and validation by position, and
    alphabetical order would make the validation split the last packages
    (xml, zipfile, zoneinfo) instead of a sample of the whole library.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [path for path in root.rglob("*.py")
             if "site-packages" not in path.parts and path.is_file()]
    return sorted(files, key=lambda path: hashlib.sha256(
        path.relative_to(root).as_posix().encode()).hexdigest())


def source_files(path: Path) -> list[Path]:
    """The files a text source is made of: itself, or a folder's files."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*")
                       if p.suffix in TEXT_SUFFIXES and p.is_file())
        if not files:
            raise UserError(f"data source {path} holds no .txt or .jsonl "
                            "files")
        return files
    if path.suffix not in TEXT_SUFFIXES:
        raise UserError(f"data source {path}: expected a .txt or .jsonl "
                        "file, a folder, or a Megatron .bin/.idx prefix")
    return [path]


def _read_text(path: Path, strict: bool) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        if not strict:
            return data.decode("utf-8", errors="replace")
        raise UserError(f"{path} is not valid UTF-8 (byte {error.start}); "
                        "convert it to UTF-8") from None


def read_records(path: Path, text_key: str, language_key: str,
                 strict: bool = True) -> Iterator[tuple[str, str]]:
    """Yield each document of a .jsonl file with its language, the code
    in the record's field language_key (a region is dropped: pt_BR is
    pt)."""
    if path.suffix != ".jsonl":
        raise UserError(f"{path}: a language field ('field:"
                        f"{language_key}' in data.languages) needs .jsonl "
                        "records; name the file's language instead")
    for number, record in _records(path, text_key, strict):
        tag = record.get(language_key)
        if not isinstance(tag, str):
            raise UserError(f"{path}:{number} has no string field "
                            f"'{language_key}' naming its language")
        try:
            yield record[text_key], checked_language(tag)
        except UserError as error:
            raise UserError(f"{path}:{number}: {error}") from None


def _records(path: Path, text_key: str,
             strict: bool) -> Iterator[tuple[int, dict]]:
    """The records of a .jsonl file with their line numbers."""
    lines = JSONL_LINE_END.split(_read_text(path, strict))
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{number} is not valid JSON "
                            f"({error.msg})") from None
        if not isinstance(record, dict) or \
                not isinstance(record.get(text_key), str):
            raise UserError(f"{path}:{number} has no string field "
                            f"'{text_key}'; set data.text_key")
        yield number, record


def read_documents(path: Path, text_key: str,
                   strict: bool = True) -> Iterator[str]:
    """Yield the documents of one file.

    A .txt file is one document; each line of a .jsonl file is one, its
    text under ``text_key``. ``strict`` refuses invalid UTF-8 instead of
    replacing it (the default corpus is read leniently).
    """
    if path.suffix != ".jsonl":
        yield _read_text(path, strict)
        return
    for _, record in _records(path, text_key, strict):
        yield record[text_key]
