"""Shared fixtures: a small multilingual corpus, a very small run, and the
single-process run that multi-process runs are compared with.

Without a GPU, Triton kernels run in Triton's interpreter; the variable
must be set before triton is first imported.
"""
import json
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from coom.data.corpus import default_corpus_files
from tests.launch import check
from tests.parallel.test_layouts import _train

MULTILINGUAL = [
    "The quick brown fox jumps over the lazy dog. Größe, café, naïve.",
    "日本語のテキストと中文文本，还有한국어 문장도 있습니다.",
    "مرحبا بالعالم، هذا نص عربي قصير.",
    "नमस्ते दुनिया, यह एक हिंदी वाक्य है।",
    "Emoji: 🤖🎉👩🏽‍🔬 and symbols ∑∫√ and tabs\tand\r\nnewlines.",
]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """Fifty standard-library files as .txt, plus multilingual lines."""
    folder = tmp_path_factory.mktemp("corpus")
    for index, path in enumerate(default_corpus_files()[:50]):
        text = path.read_text(encoding="utf-8", errors="replace")
        (folder / f"doc{index:03d}.txt").write_text(text, encoding="utf-8")
    with open(folder / "multilingual.jsonl", "w", encoding="utf-8") as file:
        for line in MULTILINGUAL * 4:
            file.write(json.dumps({"text": line}, ensure_ascii=False) + "\n")
    return folder


@pytest.fixture(scope="session")
def small_run(corpus_dir, tmp_path_factory) -> list[str]:
    """--set overrides for a run of a few seconds on corpus_dir."""
    cache = tmp_path_factory.getbasetemp() / "cache"
    return [
        f"data.paths=[{corpus_dir}]", f"data.cache_dir={cache}",
        "data.tokenizer_vocab_size=512", "data.seq_length=32",
        "model.hidden_size=32", "model.num_layers=2",
        "model.num_attention_heads=2", "model.ffn_hidden_size=64",
        "train.steps=6", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.eval_interval=3",
        "train.eval_iters=2", "schedule.lr_warmup_iters=2",
        "checkpoint.interval=3", "logging.log_interval=1",
        "logging.tensorboard=false", "logging.progress_bar=false",
    ]


@pytest.fixture(scope="session")
def single(tmp_path_factory) -> Path:
    """The single-process run that the multi-process runs are compared
    with (``tests/parallel/``, ``tests/tools/test_rebalance.py``;
    ``test_pipeline`` has its own, of 4 blocks), trained once for the
    session: each launch costs seconds of process start-up on the 2-core
    CI machine."""
    run_dir = tmp_path_factory.mktemp("single")
    check(_train(run_dir, 1))
    return run_dir
