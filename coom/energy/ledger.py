"""A run's energy, by phase and source, summed over all its processes;
the energy and time budgets; the opt-in power-limit search.

Phases. The training loop marks the end of each phase: ``setup`` (from
the trainer's creation to the first step: data, model, checkpoint load),
``step`` (a training step: data, forward, backward, optimizer, and the
loop's own logging), ``eval`` and ``checkpoint``. Each mark reads the
counters where the loop already waits for the GPU (a step ends with
``.tolist()`` of its losses, an evaluation with ``.item()``, a save with
the tensors written), so marking adds no synchronisation. Forward,
backward and optimizer are not told apart: that needs a synchronize
inside the step, which drains the GPU's queue. Nor is waiting for data:
samples are memory-mapped index lookups inside the step, too short to
meter.

Sums. After each step every process adds its cumulative figures
(seconds and joules per phase and source, which sources it could read,
whether its time is up) to one all-reduce over every process of the run:
tensor- and expert-parallel GPUs use energy too, not only the
data-parallel ones. A source counts only when every process that should
meter it did (every process for GPUs, the first of each machine for CPU
packages); a sum over some of them is not the run's energy, so it is
left out and the run says so. Every process gets the same sums and so
takes the same budget and power-limit decisions.

Resuming. A checkpoint keeps the energy used so far, which the resumed
run adds to its own. Energy spent after the last checkpoint of an
interrupted attempt is lost with that attempt's steps.
"""
import sys
import time
from functools import partial
from typing import Callable, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from coom.config import EnergyConfig
from coom.energy.meter import LABELS, SOURCES, first_on_machine, open_meter
from coom.energy.nvml import NvmlPowerLimits
from coom.energy.power import PowerLimitSearch, candidate_limits
from coom.errors import UserError

PHASES = ("setup", "step", "eval", "checkpoint")
COUNTS = ("processes", "gpu_metered", "machines", "cpu_metered",
          "out_of_time")
FIELDS = ([f"{phase}_seconds" for phase in PHASES]
          + [f"{phase}_{source}_joules" for phase in PHASES
             for source in SOURCES] + list(COUNTS))
JOULES_PER_KWH = 3.6e6


def sum_over_processes(values: list[float],
                       device: torch.device) -> list[float]:
    """values summed over every process of the run (the default process
    group); values themselves in a run of one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


class Totals:
    """Seconds and joules per phase and source, and the counts that say
    which sources are whole: of one process, or summed over all."""

    def __init__(self, values: Optional[dict] = None):
        self.values = dict.fromkeys(FIELDS, 0.0) | (values or {})

    def to_list(self) -> list[float]:
        return [self.values[name] for name in FIELDS]

    @classmethod
    def from_list(cls, numbers: list[float]) -> "Totals":
        return cls(dict(zip(FIELDS, numbers)))

    def metered(self) -> tuple[str, ...]:
        """Sources read by every process that should read them."""
        count = self.values
        whole = {"gpu": count["processes"],
                 "cpu": count["machines"]}
        return tuple(source for source in SOURCES if whole[source] > 0
                     and count[f"{source}_metered"] == whole[source])

    def joules(self, phase: Optional[str] = None,
               source: Optional[str] = None) -> float:
        """Joules of one phase (or all) and one metered source (or all
        metered ones)."""
        phases = PHASES if phase is None else (phase,)
        sources = self.metered() if source is None else (source,)
        return sum(self.values[f"{p}_{s}_joules"]
                   for p in phases for s in sources)

    def seconds(self, phase: str) -> float:
        """A phase's seconds, averaged over the processes (0 before any
        sum)."""
        return self.values[f"{phase}_seconds"] / max(
            self.values["processes"], 1.0)


def unmetered(reasons: dict[str, str]) -> str:
    """Why no source is metered, in a few words."""
    return "; ".join(reasons.values()) or "no readable meter"


def coverage(totals: Totals, reasons: dict[str, str]) -> str:
    """The line a run prints once about what it meters, when it meters
    anything (an unmetered run says so once, in its summary)."""
    count = totals.values
    parts = []
    for source, whole in (("gpu", count["processes"]),
                          ("cpu", count["machines"])):
        done = count[f"{source}_metered"]
        if whole and done == whole:
            parts.append(f"{LABELS[source]} metered")
        elif done:
            parts.append(f"{LABELS[source]} left out: {done:.0f} of "
                         f"{whole:.0f} readable")
        else:
            reason = reasons.get(source, "read by another process")
            parts.append(f"{LABELS[source]} not metered ({reason})")
    return "energy: " + "; ".join(parts)


def _say(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


class EnergyLedger:
    """The energy of a run in the making; a context manager around the
    training loop.

    Args:
        config: the energy section.
        device: the device this process trains on.
        main: whether this process prints.
        tokens_per_step: tokens of one global batch.
        exit_duration_in_mins: the time budget (None: no budget).
        meter: the counters to read (default: this process's GPU and,
            on a machine's first process, its CPU packages).
        reduce: sums a list of floats over all processes.
        power_limits: makes the PowerLimits of device for the search.
        clock: seconds, for phases and the time budget.
        job_started: the clock when this process's job began, if before
            this ledger (after a growth, the previous trainer's
            ``job_started``): the time budget counts from it, and the
            meters, announced then, are not announced again.
    """

    def __init__(self, config: EnergyConfig, device: torch.device,
                 main: bool, tokens_per_step: int,
                 exit_duration_in_mins: Optional[float] = None, meter=None,
                 reduce: Optional[Callable] = None,
                 power_limits: Callable = NvmlPowerLimits,
                 clock: Callable[[], float] = time.monotonic,
                 job_started: Optional[float] = None):
        self.config = config
        self._device = device
        self._main = main
        self._tokens_per_step = tokens_per_step
        self._seconds_left = None if exit_duration_in_mins is None \
            else exit_duration_in_mins * 60
        self._clock = clock
        self._announce = job_started is None
        self.job_started = clock() if job_started is None else job_started
        self.meter = meter or open_meter(device, first_on_machine())
        self._reduce = reduce or partial(sum_over_processes, device=device)
        self._power_limits = power_limits
        self.local = Totals({  # this process's own figures
            "processes": 1.0,
            "gpu_metered": float("gpu" in self.meter.metered),
            "machines": float(self.meter.machine_leader),
            "cpu_metered": float("cpu" in self.meter.metered)})
        self._mark = (clock(), self.meter.read())
        self.totals = Totals()
        self._recorded = self.totals
        self._steps = self._steps_since_record = 0
        self._before: dict[str, float] = {}
        self.search: Optional[PowerLimitSearch] = None
        self.stop_reason: Optional[str] = None

    def end_phase(self, phase: str) -> None:
        """Charge the time and energy since the last mark to phase."""
        now, joules = self._clock(), self.meter.read()
        then, before = self._mark
        values = self.local.values
        values[f"{phase}_seconds"] += now - then
        for source, value in joules.items():
            values[f"{phase}_{source}_joules"] += value - before[source]
        self._mark = (now, joules)

    def _sum(self) -> None:
        out_of_time = self._seconds_left is not None \
            and self._clock() - self.job_started >= self._seconds_left
        self.local.values["out_of_time"] = float(out_of_time)
        self.totals = Totals.from_list(self._reduce(self.local.to_list()))

    def __enter__(self) -> "EnergyLedger":
        self.end_phase("setup")
        self._sum()
        self._recorded = self.totals
        metered = self.totals.metered()
        if self._main and self._announce and metered:
            _say(coverage(self.totals, self.meter.reasons))
        if self.config.budget_kwh is not None and not metered:
            raise UserError("config field energy.budget_kwh: no energy "
                            "meter is readable here ("
                            f"{unmetered(self.meter.reasons)}), so the "
                            "budget cannot be kept; unset it")
        if self._before:  # resumed: the budget may be spent already
            self.stop_reason = self._energy_budget_reached()
        if self.config.power_control and self.stop_reason is None:
            self._start_search()
        return self

    def __exit__(self, kind, error, trace) -> None:
        try:
            if kind is None:
                self._sum()
        finally:
            if self.search is not None and self.search.original is not None:
                original = self.search.original
                self.search.restore()
                if self._main:
                    _say(f"energy: GPU power limit restored to "
                         f"{original:.0f} W")

    def _start_search(self) -> None:
        if "gpu" not in self.totals.metered():
            raise UserError("config field energy.power_control: needs the "
                            "energy counter of every GPU (see the line "
                            "above); set energy.power_control=false")
        limits = self._power_limits(self._device)
        candidates = self.config.power_limits \
            or candidate_limits(*limits.range_watts())
        self.search = PowerLimitSearch(limits, candidates,
                                       self.config.power_control_eta,
                                       self.config.power_control_steps)
        self.search.start()

    def step_done(self) -> Optional[str]:
        """Sum over the processes after a step; returns why the run must
        stop (a budget reached), or None."""
        before = self.totals
        self._sum()
        self._steps += 1
        self._steps_since_record += 1
        search = self.search
        if search is not None and not search.finished:
            search.observe(
                self.totals.joules("step", "gpu") - before.joules(
                    "step", "gpu"),
                self.totals.seconds("step") - before.seconds("step"),
                self._tokens_per_step, self.totals.values["gpu_metered"])
            if search.finished and self._main:
                _say("energy: " + search.describe())
        self.stop_reason = self._budget_reached()
        return self.stop_reason

    def _joules_so_far(self) -> dict[str, float]:
        """Joules by source, phase and in total, earlier attempts
        included; empty when nothing is metered."""
        totals = self.totals
        if not totals.metered():
            return {}
        parts = {"total": totals.joules()}
        parts |= {source: totals.joules(source=source)
                  for source in totals.metered()}
        parts |= {phase: totals.joules(phase) for phase in PHASES}
        return {key: value + self._before.get(key, 0.0)
                for key, value in parts.items()}

    def _budget_reached(self) -> Optional[str]:
        if self.totals.values["out_of_time"]:
            return (f"time budget reached: train.exit_duration_in_mins="
                    f"{self._seconds_left / 60:g} passed")
        return self._energy_budget_reached()

    def _energy_budget_reached(self) -> Optional[str]:
        budget = self.config.budget_kwh
        used = self._joules_so_far().get("total", 0.0) / JOULES_PER_KWH
        if budget is not None and used >= budget:
            return (f"energy budget reached: {used:.4g} kWh used of "
                    f"energy.budget_kwh={budget:g}; raise it to continue")
        return None

    def metrics(self) -> dict:
        """The energy figures of a metrics record: cumulative kWh and
        CO2e, and per-step figures over the steps since the last record.
        """
        so_far = self._joules_so_far()
        if not so_far:
            return {"energy_kwh": None}
        record = {("energy_kwh" if key == "total" else f"energy_{key}_kwh"):
                  value / JOULES_PER_KWH for key, value in so_far.items()}
        record["co2e_kg"] = record["energy_kwh"] \
            * self.config.grid_gco2_per_kwh / 1000
        steps, now, then = self._steps_since_record, self.totals, \
            self._recorded
        if steps:
            joules = now.joules("step") - then.joules("step")
            seconds = now.seconds("step") - then.seconds("step")
            record |= {"joules_per_step": joules / steps,
                       "joules_per_token": joules / (
                           steps * self._tokens_per_step)}
            if seconds > 0:
                record["power_w"] = joules / seconds
        if self.search is not None:
            record["power_limit_w"] = self.search.watts
        self._recorded, self._steps_since_record = now, 0
        return record

    def summary(self) -> str:
        """The console's line about the run's energy."""
        so_far = self._joules_so_far()
        if not so_far:
            return (f"energy: not measured ({unmetered(self.meter.reasons)}"
                    "; docs/energy.md)")
        kwh = so_far["total"] / JOULES_PER_KWH
        sources = ", ".join(f"{LABELS[s].split()[0]} "
                            f"{so_far[s] / JOULES_PER_KWH:.3g}"
                            for s in self.totals.metered())
        grid = self.config.grid_gco2_per_kwh
        line = (f"energy: {kwh:.3g} kWh ({sources}), "
                f"{kwh * grid / 1000:.3g} kg CO2e at {grid:g} g/kWh")
        if self._steps:
            per_token = self.totals.joules("step") / (
                self._steps * self._tokens_per_step)
            line += f"; training steps {per_token:.4g} J/token"
        return line

    def state_dict(self) -> dict:
        """What a checkpoint keeps: joules so far, by source, phase and
        in total."""
        # Unmetered now, the earlier attempts' energy is kept as it was.
        return {"joules": self._joules_so_far() or dict(self._before)}

    def load_state_dict(self, state: Optional[dict]) -> None:
        """Continue from a checkpoint's energy (None: none recorded)."""
        self._before = dict((state or {}).get("joules", {}))
