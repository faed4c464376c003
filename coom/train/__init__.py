"""The training loop and what it writes: checkpoints (stored by
``coom.checkpoint``), metrics, reports."""
