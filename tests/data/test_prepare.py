import gc
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from coom.config import DataConfig
from coom.data import prepare as prepare_module
from coom.data.corpus import read_documents, source_files
from coom.data.loader import build_samples
from coom.data.megatron import DType, IndexedDataset, IndexedDatasetBuilder
from coom.data.prepare import prepare
from coom.data.tokenizer import train_bpe
from coom.errors import UserError


@pytest.fixture(scope="module")
def config(tmp_path_factory, corpus_dir) -> DataConfig:
    cache = tmp_path_factory.mktemp("prepare-cache")
    return DataConfig(paths=[str(corpus_dir)], cache_dir=str(cache),
                      tokenizer_vocab_size=600, seq_length=16)


@pytest.fixture(scope="module")
def prepared(config):
    return prepare(config)


def _documents(prefix: str) -> list[np.ndarray]:
    dataset = IndexedDataset(prefix, multimodal=False)
    documents = [np.array(dataset[i]) for i in range(len(dataset))]
    del dataset
    return documents


def test_folder_of_txt_and_jsonl_becomes_an_indexed_dataset(
        prepared, corpus_dir):
    (prefix,) = prepared.prefixes
    tokenizer = prepared.tokenizer
    # Empty files (some __init__.py) hold no sequence.
    expected = [d for f in source_files(corpus_dir)
                for d in read_documents(f, "text") if d]
    documents = _documents(prefix)
    assert len(documents) == len(expected)
    for ids, text in zip(documents, expected):
        assert ids[-1] == tokenizer.eod
        assert tokenizer.decode(ids[:-1]) == text


def test_unchanged_sources_are_reused(config, prepared):
    (prefix,) = prepared.prefixes
    written = os.stat(prefix + ".bin").st_mtime_ns
    again = prepare(config)
    assert again.prefixes == prepared.prefixes
    assert again.tokenizer.fingerprint == prepared.tokenizer.fingerprint
    assert os.stat(prefix + ".bin").st_mtime_ns == written


def test_changed_source_is_prepared_again(config, tmp_path):
    source = tmp_path / "notes.txt"
    source.write_text("first version of the notes " * 50)
    mine = replace(config, paths=[str(source)],
                   tokenizer=str(prepare(config).tokenizer.path))
    first = prepare(mine).prefixes[0]
    source.write_text("second, longer version of the notes " * 80)
    second = prepare(mine).prefixes[0]
    assert first != second
    assert len(_documents(second)[0]) > len(_documents(first)[0])


def test_jsonl_text_key(config, prepared, tmp_path):
    path = tmp_path / "records.jsonl"
    rows = [{"body": f"record {i} ✓"} for i in range(5)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    mine = replace(config, paths=[str(path)], text_key="body",
                   tokenizer=str(prepared.tokenizer.path))
    documents = _documents(prepare(mine).prefixes[0])
    decoded = [prepared.tokenizer.decode(d[:-1]) for d in documents]
    assert decoded == [r["body"] for r in rows]


def _megatron_preprocessed(texts, tokenizer, prefix):
    """What Megatron's tools/preprocess_data.py --append-eod writes for
    texts: an end-of-document token after each document with tokens, an
    empty document for one without."""
    builder = IndexedDatasetBuilder(
        f"{prefix}.bin", dtype=DType.optimal_dtype(tokenizer.vocab_size))
    for text in texts:
        ids = tokenizer.encode(text)
        lengths = [len(ids) + 1] if ids else []
        builder.add_document(ids + [tokenizer.eod] if ids else [], lengths)
    builder.finalize(f"{prefix}.idx")


def test_empty_documents_are_written_as_megatron_writes_them(
        config, prepared, tmp_path):
    texts = ["first", "", "third document", ""]
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    mine = replace(config, paths=[str(path)],
                   tokenizer=str(prepared.tokenizer.path))
    ours = prepare(mine).prefixes[0]
    theirs = tmp_path / "megatron"
    _megatron_preprocessed(texts, prepared.tokenizer, theirs)
    for suffix in (".bin", ".idx"):
        assert (Path(ours + suffix).read_bytes()
                == Path(f"{theirs}{suffix}").read_bytes())


@pytest.mark.parametrize("content, words", [
    ('{"text": "fine"}\n{broken\n', "records.jsonl:2 is not valid JSON"),
    ('{"text": "fine"}\n{"body": "x"}\n', "records.jsonl:2 has no string"),
])
def test_bad_jsonl_names_file_and_line(config, prepared, tmp_path, content,
                                       words):
    path = tmp_path / "records.jsonl"
    path.write_text(content)
    mine = replace(config, paths=[str(path)],
                   tokenizer=str(prepared.tokenizer.path))
    with pytest.raises(UserError, match=words):
        prepare(mine)


def test_missing_source_is_refused(config):
    with pytest.raises(UserError, match="data.paths: /no/such/file"):
        prepare(replace(config, paths=["/no/such/file.txt"]))


@pytest.mark.parametrize("with_tokenizer", [False, True])
def test_unwritable_cache_dir_is_refused(config, prepared, tmp_path,
                                         with_tokenizer):
    """Refused in one line before a tokenizer is trained or data is
    tokenized into it."""
    (tmp_path / "a_file").write_text("")
    path = tmp_path / "notes.txt"
    path.write_text("notes " * 30)
    mine = replace(config, paths=[str(path)],
                   cache_dir=str(tmp_path / "a_file" / "cache"))
    if with_tokenizer:
        mine = replace(mine, tokenizer=str(prepared.tokenizer.path))
    with pytest.raises(UserError, match="data.cache_dir: cannot write .*"
                       "a_file/cache"):
        prepare(mine)


def test_invalid_utf8_is_refused(config, prepared, tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café".encode("latin-1"))
    mine = replace(config, paths=[str(path)],
                   tokenizer=str(prepared.tokenizer.path))
    with pytest.raises(UserError, match="not valid UTF-8"):
        prepare(mine)


def _write_megatron(prefix, documents, dtype=np.uint16):
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for ids in documents:
        builder.add_document(ids, [len(ids)])
    builder.finalize(f"{prefix}.idx")


def test_existing_megatron_blend_with_weights(config, prepared, tmp_path):
    """Two .bin/.idx prefixes blended 1:3 through Megatron's builder."""
    rng = np.random.default_rng(0)
    eod = prepared.tokenizer.eod
    prefixes = []
    for name, low in (("a", 1), ("b", 300)):
        documents = [list(rng.integers(low, low + 200, size=50)) + [eod]
                     for _ in range(200)]
        _write_megatron(tmp_path / name, documents)
        prefixes.append(str(tmp_path / name))
    mine = replace(config, paths=prefixes, weights=[1.0, 3.0],
                   tokenizer=str(prepared.tokenizer.path))
    data = prepare(mine)
    assert data.prefixes == prefixes
    train, valid = build_samples(data, mine, 7, 4, 800, 40)
    sources = [train.dataset[i]["tokens"] for i in range(800)]
    from_b = sum(int(t[t != eod].float().mean() >= 300) for t in sources)
    assert from_b / 800 == pytest.approx(0.75, abs=0.02)
    batch = train.batch(0)
    assert batch.tokens.shape == (4, 16)
    assert (batch.tokens[:, 1:] == batch.labels[:, :-1]).all()


def test_megatron_data_of_a_tokenizer_ending_documents_with_eos(
        config, tmp_path):
    """The end token of a Hugging Face tokenizer is its tokenizer_config's
    eos_token, as for Megatron's preprocess_data.py."""
    path = tmp_path / "tokenizer.json"
    eos = train_bpe(["a few words of text"] * 10, 300, path, "</s>").eod
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    _write_megatron(tmp_path / "docs", [[5, 6, 7, eos]] * 20)
    data = prepare(replace(config, paths=[str(tmp_path / "docs")],
                           tokenizer=str(path)))
    assert data.tokenizer.eod == eos


def test_data_eod_token_ends_documents_of_a_trained_tokenizer(
        config, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("notes to train a tokenizer on " * 20)
    mine = replace(config, paths=[str(path)], eod_token="<|end|>",
                   tokenizer_vocab_size=300)
    data = prepare(mine)
    (ids,) = _documents(data.prefixes[0])
    assert data.tokenizer.hf.id_to_token(int(ids[-1])) == "<|end|>"
    assert data.tokenizer.decode(ids[:-1]) == path.read_text()


def test_end_of_document_text_in_a_document_warns_once(
        config, prepared, tmp_path, capsys):
    path = tmp_path / "records.jsonl"
    texts = ["one <|endoftext|> two", "three <|endoftext|>", "four"]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    mine = replace(config, paths=[str(path)],
                   tokenizer=str(prepared.tokenizer.path))
    documents = _documents(prepare(mine).prefixes[0])
    warnings = [line for line in capsys.readouterr().err.splitlines()
                if line.startswith("warning:")]
    assert len(warnings) == 1
    assert "'<|endoftext|>'" in warnings[0]
    eod = prepared.tokenizer.eod
    assert list(documents[0]).count(eod) == 2


def test_truncated_bin_is_refused(config, prepared, tmp_path):
    prefix = tmp_path / "cut"
    _write_megatron(prefix, [[1, 2, 3, 0]] * 20)
    with open(f"{prefix}.bin", "r+b") as file:
        file.truncate(10)
    mine = replace(config, paths=[str(prefix)],
                   tokenizer=str(prepared.tokenizer.path))
    with pytest.raises(UserError, match="truncated"):
        prepare(mine)


def _broken_index(index: bytes, case: str) -> bytes:
    """index spoilt in one of the ways a .idx can be."""
    if case == "garbage":
        return b"not an index at all"
    if case == "version":
        return index[:9] + (2).to_bytes(8, "little") + index[17:]
    if case == "dtype":
        return index[:17] + bytes([99]) + index[18:]
    return index[:-8]  # cut short


@pytest.mark.parametrize("case, words", [
    ("garbage", "no Megatron index header"), ("version", "version 2"),
    ("dtype", "token type code 99"), ("cut", "need"),
])
def test_corrupt_idx_is_refused_in_one_line(config, prepared, tmp_path,
                                            monkeypatch, case, words):
    """Refused before Megatron reads it: a half-built IndexedDataset's
    __del__ would print a traceback after COOM's error."""
    prefix = tmp_path / "broken"
    _write_megatron(prefix, [[1, 2, 3, 0]] * 20)
    index = tmp_path / "broken.idx"
    index.write_bytes(_broken_index(index.read_bytes(), case))
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    mine = replace(config, paths=[str(prefix)],
                   tokenizer=str(prepared.tokenizer.path))
    with pytest.raises(UserError, match=f"not a readable Megatron index "
                       f"\\(.*{words}"):
        prepare(mine)
    gc.collect()
    assert unraisable == []


def test_idx_of_another_dataset_is_refused(config, prepared, tmp_path):
    _write_megatron(tmp_path / "mine", [[1, 2, 3, 0]] * 20)
    _write_megatron(tmp_path / "other", [[1, 2, 3, 4, 5, 0]] * 30)
    (tmp_path / "other.idx").replace(tmp_path / "mine.idx")
    mine = replace(config, paths=[str(tmp_path / "mine")],
                   tokenizer=str(prepared.tokenizer.path))
    with pytest.raises(UserError, match="do not belong together"):
        prepare(mine)


def test_token_ids_beyond_the_vocabulary_are_refused(config, prepared,
                                                     tmp_path):
    prefix = tmp_path / "foreign"
    _write_megatron(prefix, [[5, 60000, 0]] * 20)
    mine = replace(config, paths=[str(prefix)],
                   tokenizer=str(prepared.tokenizer.path))
    with pytest.raises(UserError, match="token id 60000"):
        prepare(mine)


def test_checking_a_long_bin_shows_progress(config, prepared, tmp_path,
                                            monkeypatch, capsys):
    """Finding the largest token id reads the whole .bin, minutes for a
    large dataset: a bar shows it past PROGRESS_DELAY_S."""
    monkeypatch.setattr(prepare_module, "SCAN_CHUNK", 7)
    monkeypatch.setattr(prepare_module, "PROGRESS_DELAY_S", 0)
    _write_megatron(tmp_path / "long", [[5, 6, 7, 0]] * 19 + [[5, 999]])
    mine = replace(config, paths=[str(tmp_path / "long")],
                   tokenizer=str(prepared.tokenizer.path))
    with pytest.raises(UserError, match="token id 999"):
        prepare(mine)
    assert "checking " in capsys.readouterr().err


def test_empty_megatron_dataset_is_refused_in_one_line(config, prepared,
                                                       tmp_path,
                                                       monkeypatch):
    _write_megatron(tmp_path / "empty", [])
    mine = replace(config, paths=[str(tmp_path / "empty")],
                   tokenizer=str(prepared.tokenizer.path))
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with pytest.raises(UserError, match="empty.bin is empty"):
        prepare(mine)
    gc.collect()
    assert unraisable == []


def test_megatron_only_sources_need_a_tokenizer(config, tmp_path):
    prefix = tmp_path / "only"
    _write_megatron(prefix, [[1, 2, 0]] * 20)
    with pytest.raises(UserError, match="data.tokenizer"):
        prepare(replace(config, paths=[str(prefix)]))


def test_too_little_validation_data_is_refused(config, prepared, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("only one short document")
    mine = replace(config, paths=[str(path)],
                   tokenizer=str(prepared.tokenizer.path))
    with pytest.raises(UserError, match="data.split"):
        build_samples(prepare(mine), mine, 1, 2, 10, 4)


@pytest.mark.parametrize("train_samples, valid_samples, field", [
    (16 * 10**15, 4, "train.steps asks for 16,000,000,000,000,000 training"),
    (100, 10**12, "train.eval_iters asks for 1,000,000,000,000 validation"),
])
def test_more_samples_than_megatron_can_index_are_refused(
        config, prepared, tmp_path, train_samples, valid_samples, field):
    """Megatron would count the passes over the data one by one for
    minutes, then run out of memory."""
    _write_megatron(tmp_path / "small", [list(range(1, 40)) + [0]] * 20)
    mine = replace(config, paths=[str(tmp_path / "small")], split="50,50,0",
                   tokenizer=str(prepared.tokenizer.path))
    with pytest.raises(UserError, match=f"{field} samples: .* passes over "
                       "the 400 .* tokens of .*small.*lower train"):
        build_samples(prepare(mine), mine, 1, 2, train_samples,
                      valid_samples)


def test_many_passes_over_small_data_still_build(config, prepared,
                                                 tmp_path):
    _write_megatron(tmp_path / "small", [list(range(1, 40)) + [0]] * 20)
    mine = replace(config, paths=[str(tmp_path / "small")], split="50,50,0",
                   tokenizer=str(prepared.tokenizer.path))
    train, _ = build_samples(prepare(mine), mine, 1, 2, 20_000, 4)
    assert len(train) >= 20_000  # 800 passes over 400 tokens
