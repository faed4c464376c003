"""Megatron-Core's dataset classes, imported once and quietly.

``megatron.core``'s package initialiser warns that Transformer Engine and
Apex are missing. COOM's data path uses neither, so those warnings are
noise; they are silenced for this import only.
"""
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import (
        GPTDataset,
        GPTDatasetConfig,
    )
    from megatron.core.datasets.indexed_dataset import (
        DType,
        IndexedDataset,
        IndexedDatasetBuilder,
    )

__all__ = ["BlendedMegatronDatasetBuilder", "DType", "GPTDataset",
           "GPTDatasetConfig", "IndexedDataset", "IndexedDatasetBuilder"]
