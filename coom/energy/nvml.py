"""GPU energy from NVML's total-energy counter, read-only.

``nvmlDeviceGetTotalEnergyConsumption`` counts millijoules since the driver
loaded (Volta and newer). Reading it twice gives the energy in between
exactly, with no sampling. Nothing here changes any setting of the GPU.
"""
from typing import Optional

import torch


class GpuEnergyMeter:
    """Joules used by one GPU since the meter was made.

    ``available`` is False (and ``joules()`` None) when NVML, its Python
    bindings (nvidia-ml-py) or the counter are missing.

    Args:
        device: the CUDA device to meter.
    """

    def __init__(self, device: torch.device):
        self._nvml = self._handle = None
        self._start = None
        if device.type != "cuda":
            return
        try:
            import pynvml
            pynvml.nvmlInit()
            index = device.index
            if index is None:
                index = torch.cuda.current_device()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml = pynvml
            self._start = self._millijoules()
        except Exception:
            self._nvml = self._handle = self._start = None

    @property
    def available(self) -> bool:
        return self._start is not None

    def _millijoules(self) -> int:
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)

    def joules(self) -> Optional[float]:
        """Energy since the meter was made, or None when unavailable."""
        if not self.available:
            return None
        return (self._millijoules() - self._start) / 1000.0
