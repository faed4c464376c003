"""Where a training step's time goes: one step under ``torch.profiler``.

On a GPU the step's kernels are grouped (matmuls, attention, COOM's and
inductor's Triton kernels, communication, the optimizer, copies, the
rest) against the step's wall time; what no kernel fills is idle, the
GPU waiting on the host; the largest stretches of it between kernels
say where the host fell behind. NCCL's kernels spin while they wait for
other processes and run on their own streams beside the computation, so
their share is an upper bound on what communication costs. On a CPU,
which has no device timeline, the ops' own host time is grouped the
same way, and the rest of the wall time is Python between the ops.

``coom bench --profile`` prints it after the timed steps;
``benchmarks/profile_step.py`` also lists the top kernels and host ops.
"""
import time
from collections import defaultdict
from dataclasses import asdict, dataclass

import torch
from torch.profiler import ProfilerActivity, profile

GROUPS = (
    # NCCL runs all-to-alls, and pipeline sends, as grouped send/recv.
    ("communication", ("nccl", "sendrecv", "c10d::", "gloo")),
    ("grouped matmul", ("cutlass", "_grouped_mm")),
    ("matmul", ("gemm", "nvjet", "xmma", "aten::mm", "aten::addmm",
                "aten::bmm")),
    ("attention", ("cudnn", "flash", "fmha", "scaled_dot_product")),
    ("fused by inductor", ("triton_",)),
    ("optimizer", ("multi_tensor", "adam", "_foreach")),
    ("copies and casts", ("copy", "aten::cat", "aten::to", "_to_copy")),
)
"""Groups by a substring of the kernel's or op's name, first match."""

GAPS_SHOWN = 5
"""How many of the largest idle stretches a breakdown keeps."""


def group_of(name: str) -> str:
    """A kernel's or op's group; COOM's Triton kernels are named
    _..._kernel."""
    if name.startswith("_") and name.endswith("_kernel"):
        return "triton (coom)"
    lowered = name.lower()
    for label, keys in GROUPS:
        if any(key in lowered for key in keys):
            return label
    return "other"


@dataclass(frozen=True)
class Gap:
    """A stretch of the device's timeline that no kernel covers."""

    ms: float
    at_ms: float
    """Its start, from the first kernel's start."""

    before: str
    """The kernel whose end opens it (the latest ending, on any
    stream)."""

    after: str
    """The kernel whose start closes it."""


def idle_gaps(kernels: list[tuple[float, float, str]]) -> list[Gap]:
    """The stretches between the first kernel's start and the last one's
    end that no kernel covers, on any stream, largest first; kernels are
    (start us, end us, name)."""
    kernels = sorted(kernels)
    if not kernels:
        return []
    first, covered_until, last = kernels[0]
    gaps = []
    for start, end, name in kernels[1:]:
        if start > covered_until:
            gaps.append(Gap((start - covered_until) / 1e3,
                            (covered_until - first) / 1e3, last, name))
        if end > covered_until:
            covered_until, last = end, name
    return sorted(gaps, key=lambda gap: -gap.ms)


@dataclass
class StepProfile:
    """One profiled step."""

    step_ms: float
    timeline: str
    """"GPU" (kernels' device time) or "CPU" (ops' own host time)."""

    groups_ms: dict[str, float]
    """Time by group, largest first."""

    top: list[tuple[str, float, int]]
    """The kernels (or ops) that take the most time: name, ms, calls."""

    gaps: list[Gap]
    """The GPU's idle stretches between kernels, largest first (none on
    a CPU)."""

    @property
    def busy_ms(self) -> float:
        return sum(self.groups_ms.values())

    def as_dict(self) -> dict:
        return {"step_ms": self.step_ms, "timeline": self.timeline,
                "busy_ms": self.busy_ms, "groups_ms": self.groups_ms,
                "gaps": [asdict(gap) for gap in self.gaps[:GAPS_SHOWN]]}


def _timed_step(trainer, device: torch.device) -> float:
    """One training step, to its end on the device; its wall ms."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    trainer.train_step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) * 1e3


def profile_step(trainer, top: int = 30) -> StepProfile:
    """One more step of trainer, profiled."""
    device = trainer.device
    gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if gpu else [])
    with profile(activities=activities) as profiler:
        step_ms = _timed_step(trainer, device)
    # Ranges such as the optimizer's "Optimizer.step#..." span kernels
    # and ops that count on their own: counted, they would count twice.
    annotations = {event.name for event in profiler.events()
                   if event.is_user_annotation}
    kind = torch.autograd.DeviceType.CUDA if gpu \
        else torch.autograd.DeviceType.CPU
    events = [event for event in profiler.key_averages()
              if event.key not in annotations and event.device_type == kind]

    def own_us(event) -> float:
        return event.self_device_time_total if gpu \
            else event.self_cpu_time_total

    events.sort(key=own_us, reverse=True)
    groups = defaultdict(float)
    for event in events:
        groups[group_of(event.key)] += own_us(event) / 1e3
    return StepProfile(
        step_ms, "GPU" if gpu else "CPU",
        dict(sorted(groups.items(), key=lambda item: -item[1])),
        [(event.key, own_us(event) / 1e3, event.count)
         for event in events[:top]],
        idle_gaps(kernel_spans(profiler)) if gpu else [])


def kernel_spans(profiler) -> list[tuple[float, float, str]]:
    """The profiled kernels' (start us, end us, name)."""
    return [(event.time_range.start, event.time_range.end, event.name)
            for event in profiler.events()
            if event.device_type == torch.autograd.DeviceType.CUDA
            and not event.is_user_annotation]


def describe_profile(step: dict) -> list[str]:
    """The breakdown's lines (of ``StepProfile.as_dict``): each group's
    time and share of the step's wall time, then the rest."""
    wall, busy = step["step_ms"], step["busy_ms"]
    what = "kernels" if step["timeline"] == "GPU" else "ops' own time"
    lines = [f"profiled step     {wall:.1f} ms wall; {step['timeline']} "
             f"{what} {busy:.1f} ms ({busy / wall:.0%})"]
    rest = "idle" if step["timeline"] == "GPU" else "between ops"
    for label, ms in [*step["groups_ms"].items(),
                      (rest, max(wall - busy, 0.0))]:
        lines.append(f"  {label:20s} {ms:9.1f} ms {ms / wall:6.1%}")
    if step["gaps"]:
        lines.append("largest idle stretches between kernels:")
    for gap in step["gaps"]:
        lines.append(f"  {gap['ms']:6.2f} ms at {gap['at_ms']:6.1f} ms, "
                     f"{gap['before'][:30]} -> {gap['after'][:30]}")
    return lines
