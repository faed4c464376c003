"""The sections of what a run writes: checkpoints and logs."""
from dataclasses import dataclass
from typing import Optional

from coom.config.checks import positive


@dataclass
class CheckpointConfig:
    """When checkpoints are written and how many are kept."""

    interval: int = 100
    """Save every this many steps (Megatron: save_interval); the last step
    is always saved."""

    keep: int = 2
    """Most recent checkpoints to keep; older ones are deleted."""

    background: bool = False
    """Write the tensors of checkpoints within the run from a thread
    while training goes on (DCP's async_save): a step waits only while
    they are copied to CPU memory, pinned on a GPU and kept for the next
    checkpoint, so the host holds a copy of them for the rest of the
    run. The checkpoint is published, as atomically, once written; the
    last is written before the run ends (torchtitan:
    checkpoint.async_mode="async_with_pinned_mem")."""

    init_from: Optional[str] = None
    """Start a new run from these model weights: a run directory, a
    checkpoint folder, or a Hugging Face DeepseekV3 folder (as written by
    ``coom convert``). The model section must match them; the optimizer,
    step and data position start fresh. Ignored once the run has a
    checkpoint of its own (Megatron: load with finetune)."""

    def __post_init__(self):
        positive(self, "interval", "keep")


@dataclass
class LoggingConfig:
    """What the run reports and where."""

    log_interval: int = 10
    """Write a metrics.jsonl line and a TensorBoard point every this many
    steps."""

    tensorboard: bool = True
    """Write TensorBoard event files to the run directory."""

    progress_bar: bool = True
    """Show a console progress bar."""

    def __post_init__(self):
        positive(self, "log_interval")
