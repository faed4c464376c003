"""Training and validation samples through Megatron-Core's GPTDataset.

Samples are addressed by index, so the data position of a run is just the
number of samples it has consumed: resuming from a checkpoint replays
exactly the same batches. Validation always uses the same first samples of
the validation split, so its loss is comparable from one evaluation to the
next.
"""
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from coom.config import DataConfig
from coom.data import megatron
from coom.data.mixture import (
    MixturePhase,
    blend_weights,
    language_tokens,
    plan_phases,
)
from coom.data.prepare import PreparedData
from coom.errors import UserError

# Megatron counts the passes over a dataset that its samples need one at a
# time in Python, then builds a document index of passes x documents and a
# sample index: past a million passes, or indices larger than the
# machine's memory, it runs for minutes or runs out of memory instead of
# failing.
MAX_EPOCHS = 10**6


@dataclass
class Batch:
    """One micro-batch: inputs, next-token labels and the loss mask (B, S).
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor

    def to(self, device: torch.device) -> "Batch":
        """The batch on device. A GPU gets it from pinned memory without
        waiting: a copy from pageable memory waits for the GPU's queue
        to drain first."""
        tensors = (self.tokens, self.labels, self.loss_mask)
        if device.type != "cuda" or self.tokens.is_cuda:
            return Batch(*(tensor.to(device) for tensor in tensors))
        return Batch(*(tensor.pin_memory().to(device, non_blocking=True)
                       for tensor in tensors))


class Samples:
    """Micro-batches of a Megatron dataset by sample index."""

    def __init__(self, dataset, micro_batch_size: int):
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.plan: Optional[list[MixturePhase]] = None
        """The language mixture's phases, where the sources name
        languages (``coom.data.mixture``)."""

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, start: int) -> Batch:
        """The micro-batch from sample start on. Past the samples built,
        indices wrap to the first: a rollback's skipped batches
        (``coom.train.anomaly``) may take a run that far."""
        items = [self.dataset[i % len(self.dataset)]
                 for i in range(start, start + self.micro_batch_size)]
        return Batch(*(torch.stack([item[key] for item in items])
                       for key in ("tokens", "labels", "loss_mask")))


class PhasedBlend(torch.utils.data.Dataset):
    """Datasets blended by weights that change from phase to phase, by
    sample index as Megatron's BlendedDataset, whose helper orders each
    phase's samples. A dataset's samples in a phase follow those it gave
    the phases before, so each language's data goes on where the
    previous plan left it.

    Args:
        phases: each phase's samples and the datasets' weights in it.
    """

    def __init__(self, phases: list[tuple[int, list[float]]]):
        count = len(phases[0][1])
        dataset_indices, sample_indices = [], []
        self.demand = np.zeros(count, dtype=np.int64)
        """How many samples the phases draw from each dataset."""
        for size, weights in phases:
            dataset_index = np.zeros(size, dtype=np.int16)
            sample_index = np.zeros(size, dtype=np.int64)
            megatron.build_blending_indices(
                dataset_index, sample_index,
                list(np.asarray(weights) / sum(weights)), count, size,
                False)
            sample_indices.append(sample_index + self.demand[dataset_index])
            dataset_indices.append(dataset_index)
            self.demand += np.bincount(dataset_index, minlength=count)
        self.dataset_index = np.concatenate(dataset_indices)
        self.dataset_sample_index = np.concatenate(sample_indices)
        self.datasets: list = []
        """The datasets, at least demand samples each: set once built."""

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, index: int) -> dict:
        dataset = self.datasets[self.dataset_index[index]]
        return dataset[self.dataset_sample_index[index]]


def _split_sizes(prefix: str, split_matrix) -> list[tuple[int, int]]:
    """Tokens and documents in the train and validation document ranges
    of prefix."""
    # The lengths are a view of the index's memory map, which closes when
    # the dataset object is collected: keep it alive while reading them.
    dataset = megatron.IndexedDataset(prefix, multimodal=False)
    lengths = dataset.sequence_lengths
    sizes = []
    for begin, end in split_matrix[:2]:
        first = int(round(begin * len(lengths)))
        last = int(round(end * len(lengths)))
        sizes.append((int(lengths[first:last].sum()), last - first))
    del dataset
    return sizes


def _check_index_size(prefix: str, split: str, field: str, samples: int,
                      seq_length: int, tokens: int, documents: int) -> None:
    """Refuse more samples of a split than Megatron can index."""
    epochs = -(-(samples * seq_length + 1) // tokens)
    # Megatron's document index passes through two int64 grids and an
    # int32 copy; its sample and shuffle indices take 16 bytes a sample.
    index_bytes = 20 * epochs * documents + 16 * samples
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if epochs > MAX_EPOCHS or index_bytes > memory:
        raise UserError(
            f"{field} asks for {samples:,} {split} samples: {epochs:,} "
            f"passes over the {tokens:,} {split} tokens of {prefix}, "
            f"indexed in {index_bytes / 2**30:,.1f} GiB (Megatron's "
            f"indices allow {MAX_EPOCHS:,} passes and this machine's "
            f"{memory / 2**30:,.0f} GiB): lower {field} or add data")


def _check_blend_size(prefixes: list[str], weights: list[float],
                      sizes: list, samples: list[int],
                      seq_length: int) -> None:
    """Refuse sample counts that some dataset of a blend cannot index."""
    total = sum(weights)
    for prefix, weight, splits in zip(prefixes, weights, sizes,
                                      strict=True):
        # Megatron's blend asks each dataset for 0.5% more than its share.
        share = weight / total * (1.005 if len(prefixes) > 1 else 1)
        for split, field, wanted, (tokens, documents) in zip(
                ("training", "validation"),
                ("train.steps", "train.eval_iters"), samples, splits,
                strict=True):
            _check_index_size(prefix, split, field, math.ceil(wanted * share),
                              seq_length, tokens, documents)


def _dataset_config(prepared: PreparedData, config: DataConfig, seed: int,
                    prefixes: list[str]) -> "megatron.GPTDatasetConfig":
    # Megatron's BlendedDataset calls torch.distributed.get_rank() when it
    # writes its cache, so indices are cached only in distributed runs.
    cache = None
    if torch.distributed.is_initialized():
        cache = str(Path(config.cache_dir) / "indices")
    return megatron.GPTDatasetConfig(
        random_seed=seed, sequence_length=config.seq_length,
        blend=(prefixes, None), split=config.split,
        tokenizer=prepared.tokenizer, reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False, path_to_cache=cache)


def language_validation(prepared: PreparedData, config: DataConfig,
                        seed: int, micro_batch_size: int,
                        samples: int) -> dict[str, Samples]:
    """Each language's own validation samples, at least samples of them:
    the validation documents of its datasets, blended by their size."""
    by_language: dict[str, list[str]] = {}
    for prefix, language in zip(prepared.prefixes, prepared.languages,
                                strict=True):
        by_language.setdefault(language, []).append(prefix)
    validation = {}
    for language, prefixes in sorted(by_language.items()):
        builder = megatron.BlendedMegatronDatasetBuilder(
            megatron.GPTDataset, [None, samples, None], lambda: True,
            _dataset_config(prepared, config, seed, prefixes))
        _, valid, _ = builder.build()
        validation[language] = Samples(valid, micro_batch_size)
    return validation


def _language_blend(prepared: PreparedData, config: DataConfig,
                    train_tokens: list[int], train_samples: int,
                    global_batch_size: Optional[int]
                    ) -> tuple[list[MixturePhase], PhasedBlend]:
    """The mixture plan's phases over the prepared languages, and the
    training blend that follows them."""
    changes = [(0, config.mixture, config.mixture_alpha)]
    changes += [(change.step, change.mixture, change.mixture_alpha)
                for change in config.mixture_schedule]
    if len(changes) > 1 and global_batch_size is None:
        raise ValueError("data.mixture_schedule needs the global batch "
                         "size, to place its steps")
    step_samples = global_batch_size or 1
    phases = plan_phases(
        language_tokens(prepared.languages, train_tokens), changes,
        train_samples // step_samples, step_samples * config.seq_length,
        config.max_epochs)
    blend = PhasedBlend([
        (phase.steps * step_samples,
         blend_weights(phase, prepared.languages, train_tokens))
        for phase in phases])
    return phases, blend


def build_samples(prepared: PreparedData, config: DataConfig, seed: int,
                  micro_batch_size: int, train_samples: int,
                  valid_samples: int,
                  global_batch_size: Optional[int] = None
                  ) -> tuple[Samples, Samples]:
    """Train and validation ``Samples`` of at least the sizes asked for.
    Sources with languages are blended by the mixture plan, whose
    schedule (data.mixture_schedule) counts in steps of
    global_batch_size samples."""
    dataset_config = _dataset_config(prepared, config, seed,
                                     prepared.prefixes)
    sizes = [_split_sizes(p, dataset_config.split_matrix)
             for p in prepared.prefixes]
    for prefix, ((train_tokens, _), (valid_tokens, _)) in zip(
            prepared.prefixes, sizes, strict=True):
        if min(train_tokens, valid_tokens) <= config.seq_length:
            raise UserError(
                f"{prefix}: data.split '{config.split}' leaves "
                f"{train_tokens} training and {valid_tokens} validation "
                f"tokens; each needs more than data.seq_length "
                f"{config.seq_length}: add data or change data.split")
    train_tokens = [train for (train, _), _ in sizes]
    weights, plan, blend = prepared.weights, None, None
    if prepared.languages:
        plan, blend = _language_blend(prepared, config, train_tokens,
                                      train_samples, global_batch_size)
        # Megatron builds each dataset to the samples the phases draw.
        weights = [float(max(1, count)) for count in blend.demand]
    elif config.mixture_schedule:
        raise UserError("data.mixture_schedule changes how languages mix: "
                        "name the sources' languages in data.languages")
    elif weights is None and len(sizes) > 1:
        weights = [float(train) for (train, _), _ in sizes]
    _check_blend_size(prepared.prefixes, weights or [1.0], sizes,
                      [train_samples, valid_samples], config.seq_length)
    dataset_config.blend = (prepared.prefixes, weights)
    builder = megatron.BlendedMegatronDatasetBuilder(
        megatron.GPTDataset, [train_samples, valid_samples, 0],
        lambda: True, dataset_config)
    train, valid, _ = builder.build()
    if blend is not None:
        blend.datasets = train.datasets
        train = blend
    samples = Samples(train, micro_batch_size)
    samples.plan = plan
    return samples, Samples(valid, micro_batch_size)
