"""The device a run trains on: which one, whether the model can fit it,
and reading figures back from it without waiting for the rest of its
work."""
import os
from typing import Callable

import torch

from coom.errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"config field train.device: unknown device "
                        f"'{name}'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("config field train.device: cuda asked for but no "
                        "GPU is visible; use train.device=cpu")
    return device


def _free_memory(device: torch.device) -> int:
    """Bytes the device can still allocate (on a CPU, Linux's estimate of
    the memory available without swapping)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(parameters: int, device: torch.device) -> None:
    """Each process builds the whole model in float32 before it is split;
    a model that cannot fit even that far is refused in one line rather
    than by the allocator."""
    needed, free = parameters * 4, _free_memory(device)
    if needed > free:
        raise UserError(
            f"config field model: its {parameters:,} parameters take "
            f"{needed / 2**30:,.1f} GiB in float32, more than the "
            f"{free / 2**30:,.1f} GiB free on {device}; make the model "
            "smaller (model.vocab_size, hidden_size, num_layers, "
            "n_routed_experts, ...)")


def read_later(tensor: torch.Tensor) -> Callable[[], list]:
    """Start copying tensor's values to the host; returns what waits for
    them, and for nothing the device was given after them."""
    if tensor.device.type != "cuda":
        return tensor.tolist
    host = tensor.to("cpu", non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(tensor.device))

    def read() -> list:
        copied.synchronize()
        return host.tolist()
    return read
