"""Tools that drive whole training runs or their checkpoints, above the
trainer: ``bench`` (``coom bench``), ``sweep`` (``coom bench
--energy-sweep``) and ``rebalance`` (``coom experts rebalance``)."""
