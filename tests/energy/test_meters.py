"""Energy counters: wrap-around, RAPL zones, meters that cannot be read."""
import pytest
import torch

from coom.energy.counter import NoMeterError, WrappingCounter
from coom.energy.meter import open_meter
from coom.energy.nvml import gpu_energy_counter
from coom.energy.rapl import package_counters


class Register:
    """A hardware counter whose raw value the test sets."""

    def __init__(self, value: int):
        self.value = value

    def __call__(self) -> int:
        return self.value


def test_counter_adds_the_range_when_it_wraps():
    register = Register(900)
    counter = WrappingCounter(register, 1e-6, wrap=1000)
    total = 0
    for value, step in ((950, 50), (20, 70), (500, 480), (999, 499),
                        (0, 1)):
        register.value = value
        total += step
        assert counter.joules() == pytest.approx(total * 1e-6)


def test_a_counter_that_never_wraps_counts_a_reset_as_nothing():
    """NVML's 64-bit counter going backwards is a driver reload or GPU
    reset, not a wrap of 2^64 millijoules."""
    register = Register(5_000)
    counter = WrappingCounter(register, 1e-3, wrap=None)
    register.value = 7_000
    assert counter.joules() == pytest.approx(2.0)
    register.value = 300  # reset
    assert counter.joules() == pytest.approx(2.0)
    register.value = 1_300
    assert counter.joules() == pytest.approx(3.0)


def _zone(root, name, label, energy=None, largest=None):
    zone = root / name
    zone.mkdir()
    (zone / "name").write_text(label + "\n")
    if energy is not None:
        (zone / "energy_uj").write_text(f"{energy}\n")
    if largest is not None:
        (zone / "max_energy_range_uj").write_text(f"{largest}\n")
    return zone


def test_rapl_counts_packages_only_and_handles_their_wrap(tmp_path):
    first = _zone(tmp_path, "intel-rapl:0", "package-0", 999_000, 999_999)
    _zone(tmp_path, "intel-rapl:0:0", "core", 5, 999_999)
    _zone(tmp_path, "intel-rapl:1", "psys", 5, 999_999)
    _zone(tmp_path, "intel-rapl:2", "package-1", None, 999_999)
    second = _zone(tmp_path, "intel-rapl:3", "package-2", 10, 999_999)
    counters = package_counters(tmp_path)
    assert len(counters) == 2
    (first / "energy_uj").write_text("500\n")  # wrapped: 1000 + 500 uJ
    (second / "energy_uj").write_text("2010\n")
    assert sum(c.joules() for c in counters) == pytest.approx(3500e-6)


def test_no_meter_on_a_cpu_without_rapl(tmp_path):
    meter = open_meter(torch.device("cpu"), machine_leader=True,
                       powercap=tmp_path)
    assert meter.metered == () and meter.read() == {}
    assert "no GPU" in meter.reasons["gpu"]
    assert meter.reasons["cpu"] == "no readable RAPL counter"
    with pytest.raises(NoMeterError, match="no GPU"):
        gpu_energy_counter(torch.device("cpu"))


def test_only_a_machines_first_process_reads_its_cpu(tmp_path):
    _zone(tmp_path, "intel-rapl:0", "package-0", 100, 999_999)
    leader = open_meter(torch.device("cpu"), True, tmp_path)
    other = open_meter(torch.device("cpu"), False, tmp_path)
    assert leader.metered == ("cpu",) and leader.read() == {"cpu": 0.0}
    assert other.metered == () and "cpu" not in other.reasons
