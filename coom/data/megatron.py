"""Megatron-Core's dataset classes, imported on first use and quietly.

Importing any of them runs ``megatron.core``'s package initialiser, which
loads Megatron's model code as well: some 3 s of a CPU process's start
(measured: 2.7 of a 6.9 s tiny run). Runs on random tokens
(``data.synthetic``) never read a dataset, so the classes are looked up
on first access (PEP 562's module ``__getattr__``): use them as
attributes of this module, ``megatron.GPTDataset``, not through ``from
coom.data.megatron import ...``, which would import them at once.

The initialiser also warns that Transformer Engine and Apex are missing.
COOM's data path uses neither, so those warnings are noise; they are
silenced for this import only. So is the blend's notice that it cannot
cache its indices outside a distributed run, where COOM asks for none.
"""
import importlib
import logging
import warnings

_MODULE_OF = {
    "BlendedMegatronDatasetBuilder":
        "megatron.core.datasets.blended_megatron_dataset_builder",
    "GPTDataset": "megatron.core.datasets.gpt_dataset",
    "build_blending_indices": "megatron.core.datasets.helpers",
    "GPTDatasetConfig": "megatron.core.datasets.gpt_dataset",
    "DType": "megatron.core.datasets.indexed_dataset",
    "IndexedDataset": "megatron.core.datasets.indexed_dataset",
    "IndexedDatasetBuilder": "megatron.core.datasets.indexed_dataset",
}

__all__ = sorted(_MODULE_OF)


def _not_the_cache_notice(record: logging.LogRecord) -> bool:
    return "because path_to_cache is None" not in record.getMessage()


logging.getLogger("megatron.core.datasets.blended_dataset").addFilter(
    _not_the_cache_notice)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute "
                             f"{name!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        module = importlib.import_module(_MODULE_OF[name])
    value = getattr(module, name)
    globals()[name] = value
    return value
