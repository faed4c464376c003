"""``coom plan``: a run's memory per GPU, predicted before it runs, off
COOM's own model built as each process of the layout builds it."""
