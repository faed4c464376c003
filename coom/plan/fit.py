"""Whether a plan fits its GPU, and the cheapest change that makes it.

The plan counts the bytes the run allocates (what
``torch.cuda.max_memory_allocated`` reports). A GPU must hold more:
the caching allocator's rounding and the blocks it keeps reserved
(``ALLOCATOR_OVERHEAD`` of the allocated bytes, a usual figure, not a
measured one), and the CUDA context with its libraries
(``CONTEXT_BYTES``).
"""
import dataclasses
from typing import Optional

from coom.config import RunConfig
from coom.plan.memory import fullest, memory_plan

ALLOCATOR_OVERHEAD = 0.05
CONTEXT_BYTES = 2 ** 29
GIB = 2 ** 30


def needed(peak: int) -> int:
    """The GPU memory a process whose allocations peak at peak takes."""
    return round(peak * (1 + ALLOCATOR_OVERHEAD)) + CONTEXT_BYTES


def _changed(config: RunConfig, section: str, **fields) -> RunConfig:
    return dataclasses.replace(config, **{section: dataclasses.replace(
        getattr(config, section), **fields)})


def _fixes(config: RunConfig) -> list[tuple[str, RunConfig]]:
    """Changes that save memory, cheapest in step time first."""
    train = config.train
    fixes = []
    if config.parallel.fsdp_reshard == "step":
        fixes.append(("parallel.fsdp_reshard=micro_batch", _changed(
            config, "parallel", fsdp_reshard="micro_batch")))
    modes = ("none", "selective", "full")
    for mode in modes[modes.index(train.recompute) + 1:]:
        changed = _changed(config, "train", recompute=mode)
        fixes.append((f"train.recompute={mode}", changed))
    if train.micro_batch_size > 1:
        half = train.micro_batch_size // 2
        fixes.append((f"train.micro_batch_size={half}",
                      _changed(config, "train", micro_batch_size=half)))
    return fixes


def memory_warning(config: RunConfig, world_size: int,
                   memory: int) -> Optional[str]:
    """None when config's plan fits a GPU of memory bytes; else one
    line naming the largest term and the cheapest change that fits."""
    plan = fullest(memory_plan(config, world_size))
    if needed(plan.peak) <= memory:
        return None
    term = plan.largest()
    line = (f"warning: coom plan predicts {needed(plan.peak) / GIB:.1f} "
            f"GiB on process {plan.rank}, more than the GPU's "
            f"{memory / GIB:.1f} GiB; the largest term is {term.name} "
            f"({term.bytes / GIB:.1f} GiB)")
    for change, fixed in _fixes(config):
        peak = fullest(memory_plan(fixed, world_size)).peak
        if needed(peak) <= memory:
            return (f"{line}; the cheapest fix: --set {change} "
                    f"({needed(peak) / GIB:.1f} GiB)")
    return f"{line}; spread the model over more GPUs (coom plan)"
