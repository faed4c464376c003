"""A run's plan: the memory of each process that speaks for it and the
step time, from one dry run of its model."""
from dataclasses import dataclass
from typing import Optional

from coom.config import RunConfig
from coom.errors import UserError
from coom.plan.ceilings import Ceilings, ceilings_for
from coom.plan.dry_run import DryRun, dry_run
from coom.plan.gpus import GPU
from coom.plan.memory import (
    Holdings,
    RankMemory,
    fullest,
    memory_plan,
    rank_holdings,
)
from coom.plan.step_time import StepTime, step_time


@dataclass(frozen=True)
class Plan:
    memory: list[RankMemory]
    time: StepTime
    ceilings: Ceilings
    holdings: list[Holdings]
    """What the speaking processes' builds decided, for plans of the same
    layout (``memory_plan``'s holdings)."""

    @property
    def fullest(self) -> RankMemory:
        return fullest(self.memory)


def make_plan(config: RunConfig, world_size: int, gpu: GPU,
              run: Optional[DryRun] = None,
              holdings: Optional[list[Holdings]] = None) -> Plan:
    """config's plan at world_size processes on gpu: config as on the
    GPU already (``coom.plan.ranks.as_on_gpu``); its dry run and its
    processes' holdings are made here unless given."""
    if config.fp8.recipe != "off" and not config.fp8.emulate \
            and not gpu.fp8_flops:
        raise UserError(f"fp8.recipe={config.fp8.recipe}: the {gpu.name} "
                        "has no FP8 products; plan it with fp8.recipe=off")
    run = run or dry_run(config)
    holdings = holdings or rank_holdings(config, world_size)
    memory = memory_plan(config, world_size, run, holdings)
    busiest = max(memory, key=lambda rank: rank.local_elements)
    ceilings = ceilings_for(gpu)
    time = step_time(config, world_size, run, ceilings, gpu,
                     busiest.local_elements, busiest.unit_elements)
    return Plan(memory, time, ceilings, holdings)
