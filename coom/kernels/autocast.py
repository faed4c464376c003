"""Autocast questions that every device answers, the meta device
included: there ``coom.plan`` runs a model's forward and backward to
count its memory, standing for a GPU, and torch has no autocast for meta
(it refuses even to say that it is off).

Meta is singled out by name, not by ``torch.amp.is_autocast_available``:
torch.compile cannot trace that builtin and would break the graph at
every call."""
import contextlib

import torch


def _has_autocast(device_type: str) -> bool:
    return device_type != "meta"


def product_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matrix product of x gives: autocast's where it is on,
    else x's."""
    device = x.device.type
    if _has_autocast(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """A context without autocast on device_type."""
    if _has_autocast(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def autocast_to(device_type: str,
                dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """A context in which autocast runs products in dtype on device_type,
    where that device has autocast."""
    if _has_autocast(device_type):
        return torch.autocast(device_type, dtype=dtype)
    return contextlib.nullcontext()
