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
import functools
import hashlib
import json
import multiprocessing
import shutil
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import tokenizers
from tqdm import tqdm

from coom.config import DataConfig
from coom.data import megatron
from coom.data.corpus import default_corpus_files, read_documents, source_files
from coom.data.tokenizer import END_OF_DOCUMENT, Tokenizer, train_bpe
from coom.errors import UserError

DOCUMENTS_PER_TASK = 64

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
    """Text files that become one indexed dataset."""

    name: str
    files: list[Path]
    strict_utf8: bool = True

    def fingerprint(self, text_key: str) -> str:
        digest = hashlib.sha256(text_key.encode())
        for path in self.files:
            stat = path.stat()
            digest.update(f"{path.resolve()}|{stat.st_size}|"
                          f"{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()[:16]

    def documents(self, text_key: str) -> Iterator[str]:
        for path in self.files:
            yield from read_documents(path, text_key, self.strict_utf8)

    def document_count(self) -> int | None:
        """How many documents there are, where that is known without
        reading the files (a .jsonl holds one per line)."""
        if any(path.suffix == ".jsonl" for path in self.files):
            return None
        return len(self.files)


@dataclass
class PreparedData:
    """What training reads: a tokenizer and weighted dataset prefixes."""

    tokenizer: Tokenizer
    prefixes: list[str]
    weights: Optional[list[float]]


def _is_megatron_prefix(path: str) -> bool:
    return Path(path + ".bin").exists() or Path(path + ".idx").exists()


def _resolve(config: DataConfig) -> list:
    """Each entry of data.paths as a TextSource or a Megatron prefix."""
    if not config.paths:
        return [TextSource("stdlib", default_corpus_files(), False)]
    sources = []
    for entry in config.paths:
        path = Path(entry)
        if _is_megatron_prefix(entry):
            sources.append(entry)
        elif path.exists():
            sources.append(TextSource(path.stem, source_files(path)))
        else:
            raise UserError(f"data.paths: {entry} does not exist (expected "
                            "a .txt/.jsonl file, a folder or a Megatron "
                            "prefix with .bin and .idx files)")
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
    path = cache / "tokenizers" / digest.hexdigest()[:16] / "tokenizer.json"
    eod_token = config.eod_token or END_OF_DOCUMENT
    if path.is_file():
        return Tokenizer(path, eod_token)
    _make_cache_folder(path.parent)
    print(f"training a {config.tokenizer_vocab_size}-token byte-level BPE "
          f"on {', '.join(s.name for s in texts)}")
    documents = (d for s in texts for d in s.documents(config.text_key))
    counts = [s.document_count() for s in texts]
    count = None if None in counts else sum(counts)
    return train_bpe(documents, config.tokenizer_vocab_size, path,
                     eod_token, count)


@functools.lru_cache(maxsize=1)
def _worker_tokenizer(path: str) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(path)


def _encode(tokenizer_path: str, eod: int, documents: list[str]) -> list:
    """Worker task: token ids of each document, end-of-document appended
    to those that have any (an empty document stays empty, as in
    Megatron's preprocess_data.py)."""
    encodings = _worker_tokenizer(tokenizer_path).encode_batch(documents)
    return [encoding.ids + [eod] if encoding.ids else []
            for encoding in encodings]


def _tasks(source: TextSource, text_key: str,
           eod_token: str) -> Iterator[list[str]]:
    """Batches of source's documents, warning once if a document holds
    the end-of-document token's string, which the tokenizer turns into
    the token itself and so splits the document there."""
    batch = []
    warned = False
    for document in source.documents(text_key):
        if not warned and eod_token in document:
            tqdm.write(f"warning: a document of {source.name} holds the "
                       f"end-of-document token '{eod_token}' as text; it "
                       "will be split there (see data.eod_token)",
                       file=sys.stderr)
            warned = True
        batch.append(document)
        if len(batch) == DOCUMENTS_PER_TASK:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_indexed(source: TextSource, tokenizer: Tokenizer,
                   config: DataConfig, prefix: Path) -> int:
    """Tokenize source into prefix.bin/.idx; returns the document count."""
    dtype = megatron.DType.optimal_dtype(tokenizer.vocab_size)
    builder = megatron.IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    encode = functools.partial(_encode, str(tokenizer.path), tokenizer.eod)
    count = 0
    # Spawned workers start clean: tokenizers' thread pool and torch's
    # OpenMP state are not fork-safe.
    context = multiprocessing.get_context("spawn")
    with (context.Pool(config.num_workers) as pool,
          tqdm(total=source.document_count(), unit="doc",
               desc=f"tokenizing {source.name}", dynamic_ncols=True) as bar):
        tasks = _tasks(source, config.text_key, tokenizer.eod_token)
        for encoded in pool.imap(encode, tasks):
            for ids in encoded:
                # An empty document has no sequence, as Megatron writes it.
                builder.add_document(ids, [len(ids)] if ids else [])
            count += len(encoded)
            bar.update(len(encoded))
    builder.finalize(f"{prefix}.idx")
    return count


def _prepare_text(source: TextSource, tokenizer: Tokenizer,
                  config: DataConfig, cache: Path) -> str:
    # The end-of-document token is part of the key: one tokenizer.json
    # may be used with several.
    key = hashlib.sha256((source.fingerprint(config.text_key)
                          + tokenizer.fingerprint + tokenizer.eod_token
                          ).encode()).hexdigest()[:16]
    folder = cache / "datasets" / f"{source.name}-{key}"
    prefix = folder / "tokens"
    if (folder / "manifest.json").is_file():
        return str(prefix)
    temporary = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    _make_cache_folder(temporary)
    count = _write_indexed(source, tokenizer, config, temporary / "tokens")
    manifest = {"source": source.name, "documents": count,
                "files": [str(f) for f in source.files],
                "tokenizer": str(tokenizer.path)}
    (temporary / "manifest.json").write_text(json.dumps(manifest, indent=1))
    temporary.rename(folder)
    return str(prefix)


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
    sources = _resolve(config)
    tokenizer = _tokenizer(config, sources, cache)
    prefixes = []
    for source in sources:
        if isinstance(source, TextSource):
            prefixes.append(_prepare_text(source, tokenizer, config, cache))
        else:
            check_indexed_dataset(source, tokenizer.vocab_size)
            prefixes.append(source)
    return PreparedData(tokenizer, prefixes, config.weights)
