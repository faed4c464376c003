"""Checkpoints on disk, below everything that writes or reads them.

- ``storage``: atomic, sharded checkpoints: saving, finding and loading.
- ``transform``: a checkpoint loaded whole, changed, and published beside
  it as the latest (growth and expert rebalancing).
"""
