"""Random token samples, for benchmarks that must not wait on data.

Sample i is drawn from a generator seeded by (seed, i), so a batch depends
only on where it starts, as with the real datasets.
"""
import torch

from coom.data.loader import Batch


class SyntheticSamples:
    """Uniform random tokens in micro-batches, addressed by sample index.

    Args:
        vocab_size: token ids are drawn from [0, vocab_size).
        seq_length: tokens per sample (plus one for the labels).
        micro_batch_size: samples per batch.
        seed: picks the stream.
    """

    def __init__(self, vocab_size: int, seq_length: int,
                 micro_batch_size: int, seed: int):
        self.vocab_size = vocab_size
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.seed = seed

    def sample(self, index: int) -> torch.Tensor:
        """Sample index's seq_length + 1 tokens."""
        generator = torch.Generator().manual_seed(
            self.seed * 1_000_003 + index)
        return torch.randint(0, self.vocab_size, (self.seq_length + 1,),
                             generator=generator)

    def batch(self, start: int) -> Batch:
        tokens = torch.stack([self.sample(start + offset)
                              for offset in range(self.micro_batch_size)])
        return Batch(tokens[:, :-1], tokens[:, 1:],
                     torch.ones(self.micro_batch_size, self.seq_length))
