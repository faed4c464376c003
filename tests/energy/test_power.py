"""The power-limit search, against a simulated GPU only: the real one
is never touched by tests (nor by COOM's development)."""
import pytest
import torch

from coom.config import EnergyConfig
from coom.energy.ledger import EnergyLedger
from coom.energy.nvml import NvmlPowerLimits
from coom.energy.power import PowerLimitSearch, candidate_limits
from coom.energy.tradeoff import zeus_cost
from coom.errors import UserError
from tests.energy.fakes import Clock, SimulatedGpu, fake_meter

TOKENS = 4096


def _cheapest(gpu, candidates, eta):
    """The limit of least Zeus cost by the simulation's own model."""
    def cost(watts):
        joules, seconds = gpu.step_cost(watts)
        return zeus_cost(joules / TOKENS, seconds / TOKENS, eta, gpu.high)
    return min(candidates, key=cost)


def test_candidates_run_from_high_to_low_in_steps():
    assert candidate_limits(100, 160) == [160, 135, 110, 100]
    limits = candidate_limits(200, 700)
    assert limits[0] == 700 and limits[-1] == 200 and len(limits) == 21


@pytest.mark.parametrize("eta", [0.0, 0.3, 0.5, 1.0])
def test_search_picks_the_cheapest_limit(eta):
    gpu = SimulatedGpu()
    candidates = candidate_limits(*gpu.range_watts())
    search = PowerLimitSearch(gpu, candidates, eta, steps=3)
    search.start()
    steps = 0
    while not search.finished:
        joules, seconds = gpu.step_cost(gpu.limit)
        search.observe(joules, seconds, TOKENS, gpus=1)
        steps += 1
    assert steps == 3 + len(candidates) * (1 + 3)
    assert [p.watts for p in search.profile] == candidates
    assert search.chosen == _cheapest(gpu, candidates, eta)
    assert gpu.limit == search.chosen
    search.restore()
    assert gpu.limit == 650.0
    search.restore()
    assert gpu.history[-2:] == [search.chosen, 650.0]


def test_the_balanced_choice_lies_inside_the_range():
    """The simulation is a real test: at eta 0.5 the best limit is
    neither the highest nor the lowest."""
    gpu = SimulatedGpu()
    candidates = candidate_limits(*gpu.range_watts())
    assert _cheapest(gpu, candidates, 0.5) not in (700.0, 200.0)
    assert _cheapest(gpu, candidates, 0.0) == 700.0
    assert _cheapest(gpu, candidates, 1.0) == 200.0


def _ledger(gpu, power_control=True, clock=None, meter=None):
    meter = meter or fake_meter()
    clock = clock or Clock()
    config = EnergyConfig(power_control=power_control,
                          power_limits=[700.0, 600.0, 500.0, 400.0, 300.0],
                          power_control_steps=2)
    return EnergyLedger(config, torch.device("cpu"), True, TOKENS,
                        meter=meter, clock=clock,
                        power_limits=lambda device: gpu), meter, clock


def _train_step(ledger, meter, clock, gpu):
    before = gpu.joules, gpu.seconds
    gpu.step()
    meter.counters["gpu"][0].total += gpu.joules - before[0]
    clock.now += gpu.seconds - before[1]
    ledger.end_phase("step")
    ledger.step_done()


def test_run_fixes_the_best_limit_then_restores_the_original(capsys):
    gpu = SimulatedGpu()
    ledger, meter, clock = _ledger(gpu)
    with ledger:
        for _ in range(3 + 5 * 3 + 4):
            _train_step(ledger, meter, clock, gpu)
            record = ledger.metrics()
        assert ledger.search.finished
        best = _cheapest(gpu, ledger.search.candidates, 0.5)
        assert gpu.limit == best == record["power_limit_w"]
        assert record["joules_per_step"] == pytest.approx(
            gpu.step_cost(best)[0])
    assert gpu.limit == 650.0
    said = capsys.readouterr().err
    assert f"power limit {best:.0f} W chosen" in said
    assert "restored to 650 W" in said


def test_original_limit_comes_back_on_an_error():
    gpu = SimulatedGpu()
    ledger, meter, clock = _ledger(gpu)
    with pytest.raises(RuntimeError, match="out of memory"):
        with ledger:
            _train_step(ledger, meter, clock, gpu)
            assert gpu.limit == 700.0
            raise RuntimeError("out of memory")
    assert gpu.limit == 650.0


def test_limits_are_never_touched_unless_asked():
    def refuse(device):
        raise AssertionError("power limits opened without power_control")
    ledger = EnergyLedger(EnergyConfig(), torch.device("cpu"), True, TOKENS,
                          meter=fake_meter(), clock=Clock(),
                          power_limits=refuse)
    with ledger:
        ledger.end_phase("step")
        ledger.step_done()
        assert "power_limit_w" not in ledger.metrics()
    assert ledger.search is None


def test_power_control_needs_a_gpu_energy_counter():
    gpu = SimulatedGpu()
    ledger, _, _ = _ledger(gpu, meter=fake_meter(("cpu",)))
    with pytest.raises(UserError, match="energy.power_control"):
        with ledger:
            pass
    assert gpu.history == []


def test_nvml_limits_refuse_a_cpu_run():
    with pytest.raises(UserError, match="energy.power_control.*no GPU"):
        NvmlPowerLimits(torch.device("cpu"))
