"""NVIDIA GPUs through NVML (nvidia-ml-py's ``pynvml``).

Reading: ``nvmlDeviceGetTotalEnergyConsumption`` counts the millijoules a
GPU used since the driver loaded (Volta and newer), in 64 bits. Two reads
give the energy in between exactly, with no sampling. The enforced power
limit is the most the GPU may draw, the price of time in Zeus's cost.

Writing: ``NvmlPowerLimits.set_watts`` is the only call that changes a
GPU, used by ``energy.power_control`` alone. It needs administrator
rights; never use it on a GPU you do not administer.

NVML numbers all the machine's GPUs, CUDA only those the process sees
(CUDA_VISIBLE_DEVICES), so a CUDA device is looked up by its UUID, and by
index only where torch gives no UUID.
"""
from typing import Optional

import torch

from coom.energy.counter import NoMeterError, WrappingCounter
from coom.errors import UserError


def _nvml():
    """pynvml, initialised (initialising again is harmless)."""
    try:
        import pynvml
    except ImportError:
        raise NoMeterError("nvidia-ml-py is not installed "
                           "(pip install nvidia-ml-py)") from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:
        raise NoMeterError(f"NVML did not start: {error}") from None
    return pynvml


def _handle(nvml, device: torch.device):
    index = device.index
    if index is None:
        index = torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is None:
        return nvml.nvmlDeviceGetHandleByIndex(index)
    return nvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")


def gpu_energy_counter(device: torch.device) -> WrappingCounter:
    """The energy counter of a CUDA device; raises NoMeterError, saying
    why, where there is none."""
    if device.type != "cuda":
        raise NoMeterError("the run has no GPU")
    nvml = _nvml()
    try:
        handle = _handle(nvml, device)
        return WrappingCounter(
            lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle), 1e-3,
            wrap=None)
    except nvml.NVMLError as error:
        raise NoMeterError(f"NVML energy counter: {error}") from None


def enforced_power_limit(device: torch.device) -> Optional[float]:
    """The power limit a CUDA device runs under, in watts; None where
    NVML cannot tell."""
    try:
        nvml = _nvml()
        handle = _handle(nvml, device)
        return nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000
    except Exception:
        return None


class NvmlPowerLimits:
    """One GPU's power limit in watts, for ``energy.power_control``: the
    ``PowerLimits`` of ``coom.energy.power`` on real hardware.

    Args:
        device: the CUDA device whose limit is searched.
    """

    def __init__(self, device: torch.device):
        try:
            if device.type != "cuda":
                raise NoMeterError("the run has no GPU")
            nvml = _nvml()
            try:
                self._handle = _handle(nvml, device)
            except nvml.NVMLError as error:
                raise NoMeterError(str(error)) from None
            self._nvml = nvml
        except NoMeterError as error:
            raise UserError(f"config field energy.power_control: needs "
                            f"NVIDIA GPUs through NVML, but {error}; set "
                            "energy.power_control=false") from None

    def range_watts(self) -> tuple[float, float]:
        """The lowest and highest limit the GPU accepts."""
        low, high = self._nvml.nvmlDeviceGetPowerManagementLimitConstraints(
            self._handle)
        return low / 1000, high / 1000

    def get_watts(self) -> float:
        return self._nvml.nvmlDeviceGetPowerManagementLimit(
            self._handle) / 1000

    def set_watts(self, watts: float) -> None:
        try:
            self._nvml.nvmlDeviceSetPowerManagementLimit(
                self._handle, round(watts * 1000))
        except self._nvml.NVMLError as error:
            raise UserError(
                f"config field energy.power_control: NVML refused a power "
                f"limit of {watts:.0f} W ({error}); setting limits needs "
                "administrator rights, or set energy.power_control=false"
            ) from None
