"""A run's energy: phases, sums over processes, metrics, budgets."""
import pytest
import torch

from coom.config import EnergyConfig
from coom.energy.ledger import JOULES_PER_KWH, EnergyLedger
from coom.errors import UserError
from tests.energy.fakes import Clock, add, fake_meter

CPU = torch.device("cpu")
TOKENS = 1000


def _ledger(meter, clock=None, reduce=None, minutes=None, **config):
    return EnergyLedger(EnergyConfig(**config), CPU, True, TOKENS, minutes,
                        meter=meter, reduce=reduce, clock=clock or Clock())


def _phase(ledger, meter, clock, phase, joules, seconds, source="gpu"):
    add(meter, source, joules)
    clock.now += seconds
    ledger.end_phase(phase)


def test_phases_and_per_step_figures(capsys):
    meter, clock = fake_meter(), Clock()
    ledger = _ledger(meter, clock, grid_gco2_per_kwh=400.0)
    add(meter, "gpu", 50.0)
    with ledger:  # in the order of the training loop
        _phase(ledger, meter, clock, "step", 300.0, 0.5)
        assert ledger.step_done() is None
        _phase(ledger, meter, clock, "step", 300.0, 0.5)
        _phase(ledger, meter, clock, "eval", 20.0, 0.1)
        assert ledger.step_done() is None
        record = ledger.metrics()
        _phase(ledger, meter, clock, "checkpoint", 30.0, 0.2)
        _phase(ledger, meter, clock, "step", 200.0, 0.25)
        ledger.step_done()
        later = ledger.metrics()
    assert "GPUs (NVML) metered" in capsys.readouterr().err
    total = (50 + 600 + 20) / JOULES_PER_KWH
    assert record["energy_kwh"] == pytest.approx(total)
    assert record["energy_gpu_kwh"] == pytest.approx(total)
    assert record["energy_setup_kwh"] == pytest.approx(50 / JOULES_PER_KWH)
    assert record["energy_eval_kwh"] == pytest.approx(20 / JOULES_PER_KWH)
    assert record["joules_per_step"] == pytest.approx(300.0)
    assert record["joules_per_token"] == pytest.approx(300.0 / TOKENS)
    assert record["power_w"] == pytest.approx(600.0)
    assert record["co2e_kg"] == pytest.approx(total * 400 / 1000)
    assert later["joules_per_step"] == pytest.approx(200.0)
    assert later["power_w"] == pytest.approx(800.0)
    assert later["energy_checkpoint_kwh"] == pytest.approx(
        30 / JOULES_PER_KWH)
    assert "training steps 0.2667 J/token" in ledger.summary()


def _two_processes(second_sources):
    """Process 0 meters its GPU and its machine's CPU; process 1 (same
    machine) only what second_sources says. Process 0's sums come from
    a reduce that adds process 1's figures, as an all-reduce would."""
    first = fake_meter(("gpu", "cpu"), machine_leader=True)
    second = fake_meter(second_sources, machine_leader=False)
    clock = Clock()
    other = _ledger(second, clock)
    ledger = _ledger(first, clock, reduce=lambda values: [
        a + b for a, b in zip(values, other.local.to_list())])
    with ledger:
        add(first, "gpu", 100.0)
        add(first, "cpu", 40.0)
        if "gpu" in second_sources:
            add(second, "gpu", 110.0)
        clock.now += 1.0
        ledger.end_phase("step")
        other.end_phase("step")
        ledger.step_done()
        return ledger, ledger.metrics()


def test_sums_cover_every_process(capsys):
    ledger, record = _two_processes(("gpu",))
    assert ledger.totals.values["processes"] == 2
    assert record["energy_gpu_kwh"] == pytest.approx(210 / JOULES_PER_KWH)
    assert record["energy_cpu_kwh"] == pytest.approx(40 / JOULES_PER_KWH)
    assert record["joules_per_step"] == pytest.approx(250.0)
    assert record["power_w"] == pytest.approx(250.0)  # mean step time 1 s


def test_a_source_some_processes_cannot_read_is_left_out(capsys):
    ledger, record = _two_processes(())
    assert "GPUs (NVML) left out: 1 of 2 readable" in capsys.readouterr().err
    assert "energy_gpu_kwh" not in record
    assert record["energy_kwh"] == pytest.approx(40 / JOULES_PER_KWH)


def test_unmetered_run_records_null_and_says_so_once(capsys):
    ledger = _ledger(fake_meter(()))
    with ledger:
        for _ in range(3):
            ledger.end_phase("step")
            assert ledger.step_done() is None
            assert ledger.metrics() == {"energy_kwh": None}
    assert "energy" not in capsys.readouterr().err
    summary = ledger.summary()
    assert summary.startswith("energy: not measured (")
    assert "not on this test machine" in summary and len(summary) < 100
    assert ledger.state_dict() == {"joules": {}}


def test_energy_budget_stops_after_the_step_that_reaches_it():
    meter, clock = fake_meter(), Clock()
    ledger = _ledger(meter, clock, budget_kwh=1.0)
    with ledger:
        _phase(ledger, meter, clock, "step", 0.6 * JOULES_PER_KWH, 1.0)
        assert ledger.step_done() is None
        _phase(ledger, meter, clock, "step", 0.6 * JOULES_PER_KWH, 1.0)
        reason = ledger.step_done()
    assert reason.startswith("energy budget reached: 1.2 kWh used")


def test_energy_budget_counts_earlier_attempts_and_stops_a_resume():
    meter, clock = fake_meter(), Clock()
    first = _ledger(meter, clock)
    with first:
        _phase(first, meter, clock, "step", 0.7 * JOULES_PER_KWH, 1.0)
        first.step_done()
    state = first.state_dict()
    assert state["joules"]["total"] == pytest.approx(0.7 * JOULES_PER_KWH)
    resumed = _ledger(fake_meter(), budget_kwh=1.0)
    resumed.load_state_dict(state)
    with resumed:
        assert resumed.stop_reason is None
        assert resumed.metrics()["energy_kwh"] == pytest.approx(0.7)
    spent = _ledger(fake_meter(), budget_kwh=0.5)
    spent.load_state_dict(state)
    with spent:
        assert "energy budget reached" in spent.stop_reason


def test_time_budget_stops_after_the_step_that_passes_it():
    meter, clock = fake_meter(), Clock()
    ledger = _ledger(meter, clock, minutes=1.0)
    with ledger:
        assert ledger.stop_reason is None
        _phase(ledger, meter, clock, "step", 1.0, 59.0)
        assert ledger.step_done() is None
        _phase(ledger, meter, clock, "step", 1.0, 2.0)
        assert "train.exit_duration_in_mins=1 passed" in ledger.step_done()


def test_a_trainer_after_growth_keeps_the_job_clock_and_stays_quiet(
        capsys):
    """The next trainer of the same job (after a growth) counts the time
    budget from the job's start and does not announce the meters again."""
    meter, clock = fake_meter(), Clock()
    first = _ledger(meter, clock, minutes=1.0)
    with first:
        _phase(first, meter, clock, "step", 1.0, 50.0)
        assert first.step_done() is None
    assert "metered" in capsys.readouterr().err
    second = EnergyLedger(EnergyConfig(), CPU, True, TOKENS, 1.0,
                          meter=meter, clock=clock,
                          job_started=first.job_started)
    with second:
        _phase(second, meter, clock, "step", 1.0, 11.0)
        assert "train.exit_duration_in_mins=1 passed" in second.step_done()
    assert "metered" not in capsys.readouterr().err


def test_an_energy_budget_without_a_meter_is_refused():
    with pytest.raises(UserError, match="energy.budget_kwh"):
        with _ledger(fake_meter(()), budget_kwh=1.0):
            pass


def test_a_resume_without_a_meter_keeps_the_earlier_energy():
    """Resumed where no meter is readable, the next checkpoint still holds
    what the earlier attempt measured."""
    meter, clock = fake_meter(), Clock()
    first = _ledger(meter, clock)
    with first:
        _phase(first, meter, clock, "step", 500.0, 1.0)
        first.step_done()
    resumed = _ledger(fake_meter(()))
    resumed.load_state_dict(first.state_dict())
    with resumed:
        resumed.step_done()
    assert resumed.metrics() == {"energy_kwh": None}
    assert resumed.state_dict() == first.state_dict()
