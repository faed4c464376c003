"""Megatron-Core loads only when a dataset is read (coom/data/megatron.py):
its import would add some 3 s to every process of a run on random
tokens, the multi-process tests' runs included."""
import subprocess
import sys

import pytest

from coom.data import megatron


def _modules_after(statement: str) -> str:
    """Whether megatron.core is imported after running statement in a
    fresh interpreter: "loaded" or "not loaded"."""
    probe = (f"import sys; {statement}; print('loaded' if 'megatron.core' "
             "in sys.modules else 'not loaded')")
    return subprocess.run([sys.executable, "-c", probe], check=True,
                          capture_output=True, text=True).stdout.strip()


def test_training_code_imports_no_megatron_until_a_dataset_is_read():
    assert _modules_after("import coom.train.trainer") == "not loaded"
    assert _modules_after("from coom.data import megatron; "
                          "megatron.GPTDataset") == "loaded"


def test_classes_come_from_megatron_core():
    assert megatron.IndexedDataset.__module__ == \
        "megatron.core.datasets.indexed_dataset"
    with pytest.raises(AttributeError, match="no attribute 'GPT'"):
        megatron.GPT
