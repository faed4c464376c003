"""Turn text sources into Megatron indexed datasets, cached by content.

``prepare`` resolves every entry of ``data.paths`` to a ``.bin``/``.idx``
prefix. Text sources are tokenized by worker processes, one end-of-document
token after each document, and written with Megatron-Core's
``IndexedDatasetBuilder``. The result lives in ``data.cache_dir`` under a
key made of the source files (path, size, modification time), the text key
and the tokenizer, so an unchanged source is tokenized once. A prepared
dataset is written to a temporary folder and renamed into place, so an
interrupted preparation never leaves a half-written dataset behind.
Existing Megatron prefixes are checked, not copied.
"""
import collections
import functools
import hashlib
import json
import multiprocessing
import random
import shutil
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import tokenizers
from tqdm import tqdm

from coom.config import DataConfig
from coom.data import locale_sample, megatron
from coom.data.corpus import (
    default_corpus_files,
    read_documents,
    read_records,
    source_files,
)
from coom.data.identify import IDENTIFY, candidates, identified
from coom.data.languages import (
    LanguageStatistics,
    checked_language,
    document_statistics,
)
from coom.data.tokenizer import END_OF_DOCUMENT, Tokenizer, train_bpe
from coom.errors import UserError

DOCUMENTS_PER_TASK = 64

FIELD = "field:"
"""A data.languages entry naming the records' language field."""

GETTEXT = "gettext"
"""The data.paths entry of the machine's translated program messages:
the languages with at least GETTEXT_DOCUMENTS[0] strings, each with its
first GETTEXT_DOCUMENTS[1] (a sample a 2-core CPU prepares in a
minute)."""
GETTEXT_DOCUMENTS = (200, 1500)

# The head of a Megatron .idx: magic, version 1, dtype code, then the
# sequence and document counts; int32 lengths, int64 pointers and int64
# document indices follow.
INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_HEAD = struct.Struct("<9sQBQQ")

# Tokens of a .bin read at a time when checking it, and the seconds a
# check takes before it shows a progress bar.
SCAN_CHUNK = 1 << 26
PROGRESS_DELAY_S = 1.0


@dataclass
class TextSource:
    """Text files that become one indexed dataset, or one per language.

    language is their language code, 'field:KEY' for each record's own
    or 'identify' (then one dataset per language), or None.
    """

    name: str
    files: list[Path]
    strict_utf8: bool = True
    language: Optional[str] = None
    labels: Optional[Path] = None
    """Each document's identified language, one code a line."""

    @property
    def language_key(self) -> Optional[str]:
        """The .jsonl field that names each document's language."""
        if self.language and self.language.startswith(FIELD):
            return self.language.removeprefix(FIELD)
        return None

    @property
    def by_document(self) -> bool:
        """Whether each document has its own language."""
        return self.language_key is not None or self.labels is not None

    def fingerprint(self, text_key: str) -> str:
        digest = hashlib.sha256(text_key.encode())
        if self.by_document:
            digest.update(f"{self.language}\n".encode())
        for path in self.files:
            stat = path.stat()
            digest.update(f"{path.resolve()}|{stat.st_size}|"
                          f"{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()[:16]

    def documents(self, text_key: str) -> Iterator[str]:
        for path in self.files:
            yield from read_documents(path, text_key, self.strict_utf8)

    def records(self, text_key: str) -> Iterator[tuple[str, Optional[str]]]:
        """Each document and its language."""
        key = self.language_key
        if self.labels is not None:
            with open(self.labels, encoding="utf-8") as labels:
                for document, label in zip(self.documents(text_key),
                                           labels, strict=True):
                    yield document, label.rstrip("\n")
        elif key is None:
            for document in self.documents(text_key):
                yield document, self.language
        else:
            for path in self.files:
                yield from read_records(path, text_key, key,
                                        self.strict_utf8)

    def document_count(self) -> int | None:
        """How many documents there are, where that is known without
        reading the files (a .jsonl holds one per line)."""
        if any(path.suffix == ".jsonl" for path in self.files):
            return None
        return len(self.files)


@dataclass
class PreparedData:
    """What training reads: a tokenizer and weighted dataset prefixes,
    with the language of each where the sources name them, and what the
    text sources held of each language."""

    tokenizer: Tokenizer
    prefixes: list[str]
    weights: Optional[list[float]]
    languages: Optional[list[str]] = None
    statistics: dict[str, LanguageStatistics] = field(default_factory=dict)


def _is_megatron_prefix(path: str) -> bool:
    return Path(path + ".bin").exists() or Path(path + ".idx").exists()


def _gettext_source(cache: Path) -> TextSource:
    """The machine's translated program messages, one .jsonl file per
    language (``coom.data.locale_sample``), written once into the
    cache."""
    folder = cache / GETTEXT
    if not (folder / "languages.json").is_file():
        _make_cache_folder(folder)
        print(f"collecting the machine's translated messages into {folder}")
        written = locale_sample.write_sample(
            folder, locale_sample.DEFAULT_ROOT,
            min_docs=GETTEXT_DOCUMENTS[0], max_docs=GETTEXT_DOCUMENTS[1])
        (folder / "languages.json").write_text(json.dumps(written))
    return TextSource(GETTEXT, sorted(folder.glob("*.jsonl")),
                      language=FIELD + "lang")


def _language(entry: str, language: Optional[str]) -> Optional[str]:
    """data.languages' entry for the source entry, checked."""
    if language is None or language.startswith(FIELD):
        if language == FIELD:
            raise UserError(f"data.languages: '{FIELD}' for {entry} needs "
                            "the field's name, e.g. 'field:lang'")
        return language
    if language.split(":")[0] == IDENTIFY:
        candidates(language)
        return language
    try:
        return checked_language(language)
    except UserError as error:
        raise UserError(f"data.languages: {error} (for {entry})") from None


def _identified(source: TextSource, config: DataConfig,
                cache: Path) -> TextSource:
    """source with its documents' languages identified, where its
    data.languages entry asks for that."""
    if source.language is None \
            or source.language.split(":")[0] != IDENTIFY:
        return source
    source.labels = identified(
        source.name, source.documents(config.text_key),
        source.fingerprint(config.text_key), candidates(source.language),
        cache, config.num_workers)
    return source


def _resolve(config: DataConfig, cache: Path) -> list:
    """Each entry of data.paths as a TextSource or a Megatron prefix and
    its language."""
    if not config.paths:
        return [TextSource("stdlib", default_corpus_files(), False)]
    sources = []
    languages = config.languages or [None] * len(config.paths)
    for entry, language in zip(config.paths, languages, strict=True):
        path = Path(entry)
        if entry == GETTEXT:
            sources.append(_gettext_source(cache))
            continue
        language = _language(entry, language)
        if _is_megatron_prefix(entry):
            if language and ":" in language:
                raise UserError(f"data.languages: {entry} is a prepared "
                                "Megatron dataset, whose documents are "
                                "token ids; name its language")
            sources.append((entry, language))
        elif path.exists():
            sources.append(_identified(
                TextSource(path.stem, source_files(path), language=language),
                config, cache))
        else:
            raise UserError(f"data.paths: {entry} does not exist (expected "
                            "a .txt/.jsonl file, a folder, a Megatron "
                            "prefix with .bin and .idx files, or "
                            f"'{GETTEXT}')")
    return sources


def _make_cache_folder(folder: Path) -> None:
    """Make folder inside data.cache_dir, refusing in one line if the
    cache cannot be written (before any work goes into filling it)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"data.cache_dir: cannot write {folder} "
                        f"({error.strerror}); set data.cache_dir to a "
                        "writable folder") from None


def _tokenizer(config: DataConfig, sources: list, cache: Path) -> Tokenizer:
    if config.tokenizer is not None:
        if not Path(config.tokenizer).is_file():
            raise UserError(f"data.tokenizer: {config.tokenizer} does not "
                            "exist")
        return Tokenizer(Path(config.tokenizer), config.eod_token)
    texts = [s for s in sources if isinstance(s, TextSource)]
    if not texts:
        raise UserError("data.tokenizer: every source is a prepared "
                        "Megatron dataset, so give the tokenizer.json it "
                        "was made with")
    digest = hashlib.sha256(str(config.tokenizer_vocab_size).encode())
    # Unset, it adds nothing, so tokenizers cached before it existed stay.
    digest.update((config.eod_token or "").encode())
    for source in texts:
        digest.update(source.fingerprint(config.text_key).encode())
    balanced = any(source.language for source in texts) \
        and (config.tokenizer_alpha != 1 or config.tokenizer_floor > 0)
    if balanced:
        digest.update(f"alpha {config.tokenizer_alpha} floor "
                      f"{config.tokenizer_floor}".encode())
    path = cache / "tokenizers" / digest.hexdigest()[:16] / "tokenizer.json"
    eod_token = config.eod_token or END_OF_DOCUMENT
    if path.is_file():
        return Tokenizer(path, eod_token)
    _make_cache_folder(path.parent)
    print(f"training a {config.tokenizer_vocab_size}-token byte-level BPE "
          f"on {', '.join(s.name for s in texts)}"
          + (f", languages balanced (alpha {config.tokenizer_alpha}, "
             f"floor {config.tokenizer_floor})" if balanced else ""))
    if balanced:
        documents, count = _balanced(texts, config.text_key,
                                     config.tokenizer_alpha,
                                     config.tokenizer_floor), None
    else:
        documents = (d for s in texts for d in s.documents(config.text_key))
        counts = [s.document_count() for s in texts]
        count = None if None in counts else sum(counts)
    return train_bpe(documents, config.tokenizer_vocab_size, path,
                     eod_token, count)


def _balanced(texts: list[TextSource], text_key: str, alpha: float,
              floor: float) -> Iterator[str]:
    """The sources' documents, each repeated (or dropped) at random so
    that each language's share of the bytes is proportional to its bytes
    to the power alpha, but at least floor times an equal share, in as
    many bytes as the sources hold: rare languages get more of the
    tokenizer's vocabulary. The draw is seeded, so the tokenizer is
    reproducible."""
    sizes = collections.Counter()
    for source in texts:
        for document, language in source.records(text_key):
            sizes[language] += len(document.encode("utf-8"))
    total = sum(sizes.values())
    powered = {language: size ** alpha for language, size in sizes.items()}
    scale = total / sum(powered.values())
    least = floor * total / len(sizes)
    weights = {language: max(weight * scale, least)
               for language, weight in powered.items()}
    scale = total / sum(weights.values())
    copies = {language: scale * weights[language] / size if size else 0.0
              for language, size in sizes.items()}
    draw = random.Random(0)
    for source in texts:
        for document, language in source.records(text_key):
            expected = copies[language]
            whole = int(expected)
            for _ in range(whole + (draw.random() < expected - whole)):
                yield document


@functools.lru_cache(maxsize=1)
def _worker_tokenizer(path: str) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(path)


def _encode(tokenizer_path: str, eod: int, documents: list[str]
            ) -> list[tuple[list[int], LanguageStatistics]]:
    """Worker task: token ids of each document, end-of-document appended
    to those that have any (an empty document stays empty, as in
    Megatron's preprocess_data.py), and its statistics."""
    encodings = _worker_tokenizer(tokenizer_path).encode_batch(documents)
    return [(encoding.ids + [eod] if encoding.ids else [],
             document_statistics(document, len(encoding.ids)))
            for document, encoding in zip(documents, encodings)]


def _tasks(source: TextSource, text_key: str, eod_token: str
           ) -> Iterator[tuple[list[str], list[Optional[str]]]]:
    """Batches of source's documents and their languages, warning once
    if a document holds the end-of-document token's string, which the
    tokenizer turns into the token itself and so splits the document
    there."""
    batch, languages = [], []
    warned = False
    for document, language in source.records(text_key):
        if not warned and eod_token in document:
            tqdm.write(f"warning: a document of {source.name} holds the "
                       f"end-of-document token '{eod_token}' as text; it "
                       "will be split there (see data.eod_token)",
                       file=sys.stderr)
            warned = True
        batch.append(document)
        languages.append(language)
        if len(batch) == DOCUMENTS_PER_TASK:
            yield batch, languages
            batch, languages = [], []
    if batch:
        yield batch, languages


class _Outputs:
    """The indexed datasets a source is written into: one, or with a
    language field one per language (LANGUAGE/tokens), each with its
    statistics."""

    def __init__(self, folder: Path, dtype, by_language: bool):
        self.folder, self.dtype, self.by_language = folder, dtype, by_language
        self.builders, self.statistics = {}, {}

    def prefix(self, language: Optional[str]) -> str:
        if not self.by_language:
            return "tokens"
        return f"{language}/tokens"

    def add(self, ids: list[int], language: Optional[str],
            statistics: LanguageStatistics) -> None:
        if language not in self.builders:
            path = self.folder / self.prefix(language)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.builders[language] = megatron.IndexedDatasetBuilder(
                f"{path}.bin", dtype=self.dtype)
            self.statistics[language] = LanguageStatistics()
        # An empty document has no sequence, as Megatron writes it.
        self.builders[language].add_document(ids, [len(ids)] if ids else [])
        self.statistics[language].add(statistics)

    def finalize(self) -> dict:
        """The manifest's entry of each dataset, by language ('' for
        none)."""
        entries = {}
        for language, builder in self.builders.items():
            builder.finalize(f"{self.folder / self.prefix(language)}.idx")
            entries[language or ""] = {
                "prefix": self.prefix(language),
                **vars(self.statistics[language])}
        return entries


def _write_indexed(source: TextSource, tokenizer: Tokenizer,
                   config: DataConfig, folder: Path) -> dict:
    """Tokenize source into folder; returns the manifest's datasets."""
    dtype = megatron.DType.optimal_dtype(tokenizer.vocab_size)
    outputs = _Outputs(folder, dtype, source.by_document)
    encode = functools.partial(_encode, str(tokenizer.path), tokenizer.eod)
    languages = collections.deque()

    def texts() -> Iterator[list[str]]:
        for batch, batch_languages in _tasks(source, config.text_key,
                                             tokenizer.eod_token):
            languages.append(batch_languages)
            yield batch
    # Spawned workers start clean: tokenizers' thread pool and torch's
    # OpenMP state are not fork-safe.
    context = multiprocessing.get_context("spawn")
    with (context.Pool(config.num_workers) as pool,
          tqdm(total=source.document_count(), unit="doc",
               desc=f"tokenizing {source.name}", dynamic_ncols=True) as bar):
        for encoded in pool.imap(encode, texts()):
            for (ids, statistics), language in zip(encoded,
                                                   languages.popleft()):
                outputs.add(ids, language, statistics)
            bar.update(len(encoded))
    if not outputs.builders:
        outputs.add([], source.language, LanguageStatistics())
    return outputs.finalize()


def _prepare_text(source: TextSource, tokenizer: Tokenizer,
                  config: DataConfig, cache: Path) -> list[tuple]:
    """source's datasets, prepared if new: each one's prefix, language
    and statistics (None for a dataset prepared before COOM counted
    them)."""
    # The end-of-document token is part of the key: one tokenizer.json
    # may be used with several.
    key = hashlib.sha256((source.fingerprint(config.text_key)
                          + tokenizer.fingerprint + tokenizer.eod_token
                          ).encode()).hexdigest()[:16]
    folder = cache / "datasets" / f"{source.name}-{key}"
    if not (folder / "manifest.json").is_file():
        temporary = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(temporary, ignore_errors=True)
        _make_cache_folder(temporary)
        datasets = _write_indexed(source, tokenizer, config, temporary)
        manifest = {"source": source.name,
                    "documents": sum(d["documents"]
                                     for d in datasets.values()),
                    "files": [str(f) for f in source.files],
                    "tokenizer": str(tokenizer.path), "datasets": datasets}
        (temporary / "manifest.json").write_text(
            json.dumps(manifest, indent=1))
        temporary.rename(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    # Datasets prepared before languages were counted: one, no figures.
    datasets = manifest.get("datasets", {"": {"prefix": "tokens"}})
    return [(str(folder / entry["prefix"]),
             language or source.language,
             LanguageStatistics(**{name: value
                                   for name, value in entry.items()
                                   if name != "prefix"})
             if len(entry) > 1 else None)
            for language, entry in sorted(datasets.items())]


def _index_problem(path: Path) -> str | None:
    """What makes path no Megatron .idx, if anything.

    Checked before Megatron reads it: an IndexedDataset that fails half
    built fails again in its __del__, which prints a traceback after
    COOM's own error.
    """
    with open(path, "rb") as file:
        head = file.read(INDEX_HEAD.size)
    if len(head) < INDEX_HEAD.size or not head.startswith(INDEX_MAGIC):
        return "no Megatron index header"
    _, version, code, sequences, documents = INDEX_HEAD.unpack(head)
    if version != 1:
        return f"index version {version}, not 1"
    if code not in {dtype.value for dtype in megatron.DType}:
        return f"unknown token type code {code}"
    needed = INDEX_HEAD.size + sequences * 12 + documents * 8
    if path.stat().st_size < needed:
        return (f"{path.stat().st_size} bytes, but its {sequences} "
                f"sequences and {documents} documents need {needed}")
    return None


def _largest_token(path: str, dtype) -> int:
    """The largest token id in a .bin, read in chunks behind a progress
    bar: a large dataset takes minutes to read."""
    tokens = np.memmap(path, dtype=dtype, mode="r")
    largest = 0
    with tqdm(total=tokens.nbytes, unit="B", unit_scale=True,
              desc=f"checking {path}", delay=PROGRESS_DELAY_S,
              dynamic_ncols=True) as bar:
        for start in range(0, tokens.size, SCAN_CHUNK):
            chunk = tokens[start:start + SCAN_CHUNK]
            largest = max(largest, int(chunk.max()))
            bar.update(chunk.nbytes)
    return largest


def check_indexed_dataset(prefix: str, vocab_size: int) -> None:
    """Refuse a missing, truncated or foreign-vocabulary .bin/.idx pair."""
    for suffix in (".bin", ".idx"):
        if not Path(prefix + suffix).is_file():
            raise UserError(f"data.paths: {prefix}{suffix} is missing")
    problem = _index_problem(Path(prefix + ".idx"))
    if problem is not None:
        raise UserError(f"{prefix}.idx is not a readable Megatron index "
                        f"({problem})")
    # Megatron cannot map an empty file, and fails again in __del__.
    if Path(prefix + ".bin").stat().st_size == 0:
        raise UserError(f"{prefix}.bin is empty: the dataset holds no "
                        "tokens; remove it from data.paths")
    try:
        dataset = megatron.IndexedDataset(prefix, multimodal=False,
                                          mmap=True)
        index = dataset.index
        lengths, pointers = index.sequence_lengths, index.sequence_pointers
    except Exception as error:
        raise UserError(f"{prefix}.idx is not a readable Megatron index "
                        f"({str(error).splitlines()[0]})") from None
    expected = 0
    if len(lengths):
        expected = int(pointers[-1]) + int(lengths[-1]) * index.dtype_size
    actual = Path(prefix + ".bin").stat().st_size
    if actual != expected:
        raise UserError(f"{prefix}.bin has {actual} bytes but {prefix}.idx "
                        f"describes {expected}: a file is truncated or the "
                        "two do not belong together")
    largest = _largest_token(prefix + ".bin", index.dtype)
    if largest >= vocab_size:
        raise UserError(f"{prefix}.bin holds token id {largest} but the "
                        f"tokenizer has only {vocab_size} tokens; set "
                        "data.tokenizer to the tokenizer it was made with")


def prepare(config: DataConfig) -> PreparedData:
    """Tokenizer and dataset prefixes for config, preparing what is new."""
    cache = Path(config.cache_dir)
    sources = _resolve(config, cache)
    tokenizer = _tokenizer(config, sources, cache)
    datasets = []
    for source in sources:
        if isinstance(source, TextSource):
            datasets += _prepare_text(source, tokenizer, config, cache)
        else:
            prefix, language = source
            check_indexed_dataset(prefix, tokenizer.vocab_size)
            datasets.append((prefix, language, None))
    prepared = PreparedData(tokenizer, [d[0] for d in datasets],
                            config.weights)
    if any(language for _, language, _ in datasets):
        untagged = [prefix for prefix, language, _ in datasets
                    if not language]
        if untagged:
            raise UserError(f"data.languages: {untagged[0]} has no "
                            "language; name one for every source")
        prepared.languages = [language for _, language, _ in datasets]
    for _, language, statistics in datasets:
        if language and statistics is not None:
            prepared.statistics.setdefault(
                language, LanguageStatistics()).add(statistics)
    return prepared
