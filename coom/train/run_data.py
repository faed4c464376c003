"""What a run reads: its tokenizer, its training and validation samples
and, where the sources name languages, each language's validation
samples and statistics, and the mixture plan (written to the run as
``mixture.json``)."""
import json
import math
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from coom.config import RunConfig
from coom.data.languages import LanguageStatistics
from coom.data.loader import Samples, build_samples, language_validation
from coom.data.mixture import describe_plan, plan_record
from coom.data.prepare import prepare
from coom.data.synthetic import SyntheticSamples
from coom.data.tokenizer import Tokenizer
from coom.errors import UserError
from coom.parallel.mesh import World
from coom.train.run_dir import write_atomically

MIXTURE = "mixture.json"
"""The run's language mixture plan, where its sources name languages."""


@dataclass
class RunData:
    """A run's samples and what it knows of them."""

    tokenizer: Optional[Tokenizer]
    """None for random tokens (data.synthetic)."""

    samples: Samples
    valid: Samples
    valid_by_language: dict[str, Samples] = field(default_factory=dict)
    """Each language's validation samples, where sources name them."""

    statistics: dict[str, LanguageStatistics] = field(default_factory=dict)
    """Each language's prepared statistics, where sources name them."""

    @property
    def tokenizer_sha256(self) -> Optional[str]:
        return None if self.tokenizer is None else self.tokenizer.fingerprint

    @property
    def tokenizer_label(self) -> str:
        if self.tokenizer is None:
            return "this run's random tokens (data.synthetic)"
        return str(self.tokenizer.path)

    def bits_per_byte(self, language: str, loss: float) -> Optional[float]:
        """language's loss per token in bits per byte of its text, which
        compares across languages and tokenizers; None where its bytes
        are unknown."""
        figures = self.statistics.get(language)
        if figures is None or not figures.bytes:
            return None
        return loss * figures.tokens_per_byte / math.log(2)


def _resolved(config: RunConfig, tokenizer: Tokenizer, run_dir: Path,
              main: bool) -> RunConfig:
    """config with the tokenizer copied into the run, its end-of-document
    token named (the copy leaves any tokenizer_config.json behind) and
    the model's vocabulary size filled in, so that a resume finds all
    three."""
    vocab = tokenizer.vocab_size
    size = config.model.vocab_size
    if size is not None and size < vocab:
        raise UserError(
            f"config field model.vocab_size: {size} is smaller than the "
            f"tokenizer's {vocab} tokens ({tokenizer.path}); raise it or "
            "leave it unset")
    kept = run_dir / "tokenizer.json"
    if main and not kept.exists():
        shutil.copyfile(tokenizer.path, kept)
    return replace(config,
                   model=replace(config.model, vocab_size=size or vocab),
                   data=replace(config.data, tokenizer=str(kept),
                                eod_token=tokenizer.eod_token))


def read_run_data(config: RunConfig, world: World,
                  run_dir: Path) -> tuple[RunData, RunConfig]:
    """The run's data, and config resolved by its tokenizer: model
    .vocab_size filled in and the tokenizer copied into run_dir."""
    train = config.train
    if config.data.synthetic:
        samples, valid = (
            SyntheticSamples(config.model.vocab_size, config.data.seq_length,
                             train.micro_batch_size, seed)
            for seed in (train.seed, train.seed + 1))
        return RunData(None, samples, valid), config
    # The first process prepares the data (and copies the tokenizer into
    # the run) while the others wait, then they find it ready.
    if not world.main:
        world.barrier()
    prepared = prepare(config.data)
    config = _resolved(config, prepared.tokenizer, run_dir, world.main)
    if world.main:
        world.barrier()
    samples, valid = build_samples(
        prepared, config.data, train.seed, train.micro_batch_size,
        train.steps * train.global_batch_size,
        train.eval_iters * train.micro_batch_size,
        global_batch_size=train.global_batch_size)
    data = RunData(prepared.tokenizer, samples, valid)
    if prepared.languages and train.eval_iters_per_language:
        data.valid_by_language = language_validation(
            prepared, config.data, train.seed, train.micro_batch_size,
            train.eval_iters_per_language * train.micro_batch_size)
        data.statistics = prepared.statistics
    if samples.plan is not None and world.main:
        print(describe_plan(samples.plan))
        write_atomically(run_dir / MIXTURE,
                         json.dumps(plan_record(samples.plan), indent=1))
    return data, config
