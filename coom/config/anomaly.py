"""The train.anomaly section: what a step with a non-finite or spiking
loss does."""
from dataclasses import dataclass
from typing import Literal

from coom.config.checks import positive, require

SpikePolicy = Literal["off", "log", "skip", "rollback"]


@dataclass
class AnomalyConfig:
    """Loss spikes and non-finite steps (``coom/train/anomaly.py``,
    ``docs/resilience.md``). A step whose loss or gradient norm is not
    finite never updates the weights."""

    spike: SpikePolicy = "log"
    """What a spike does: 'log' records it in metrics.jsonl and applies
    the step; 'skip' leaves the weights and optimizer as they were;
    'rollback' goes back to the latest checkpoint and skips the data from
    there through the spike's batch and skip_batches more, as PaLM's
    authors did; 'off' looks for none."""

    deviations: float = 6.0
    """A spike is a loss or gradient norm this many standard deviations
    above the mean of the window's accepted steps."""

    window: int = 100
    """How many of the latest accepted steps the mean and deviation
    cover."""

    min_steps: int = 20
    """Accepted steps the window needs before it calls anything a
    spike."""

    skip_batches: int = 100
    """Under 'rollback', global batches skipped past the spike's."""

    max_in_a_row: int = 5
    """Steps in a row that may be skipped or rolled back (non-finite or
    spiking) before the run stops with an error: it has diverged."""

    def __post_init__(self):
        positive(self, "deviations", "window", "min_steps", "max_in_a_row")
        require(self.min_steps <= self.window, "min_steps",
                f"{self.min_steps} exceeds window {self.window}")
        require(self.skip_batches >= 0, "skip_batches", "must be >= 0")
