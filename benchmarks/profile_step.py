"""Where a training step of the `small` preset spends its GPU time.

Builds the same trainer as `coom bench` (random tokens, or the recipe's
data with --real-data), evaluates once as `coom bench` and a run do
(under torch.compile that decides what gets traced), runs warm-up
steps, profiles one step with torch.profiler and prints the GPU kernels
that take the most time, in the groups of `coom bench --profile`
(`coom.tools.profile`), against the step's wall time, and the longest
stretches in which the GPU waited between kernels; then the CPU-side
ops that take the most of the host's time. `coom bench --profile` gives
the groups alone, on one process.

Run on the device machine from the repository root:

    python3 benchmarks/profile_step.py --set train.compile=true

Under torchrun each process profiles its own step and the first one
prints, for instance the all-to-all share under expert parallelism:

    torchrun --nproc-per-node 2 benchmarks/profile_step.py \
        --set parallel.expert=2

NCCL's kernels also spin while they wait for the other processes, and
run on their own streams beside the computation, so their share is an
upper bound on the time communication costs the step.
"""
import argparse
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from coom.config import load_config
from coom.tools.bench import bench_config
from coom.tools.profile import group_of, idle_gaps, kernel_spans
from coom.train.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="small")
    parser.add_argument("--set", nargs="*", default=[], dest="overrides")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--real-data", action="store_true",
                        help="the recipe's data instead of random tokens")
    args = parser.parse_args()
    config = load_config(args.recipe, args.overrides)
    config = bench_config(config, steps=1, warmup=args.warmup,
                          real_data=args.real_data)
    trainer = Trainer(config, Path(tempfile.mkdtemp()))
    trainer.evaluate(trainer.data.valid)
    for _ in range(args.warmup):
        trainer.train_step()
    torch.cuda.synchronize()
    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    with profile(activities=[ProfilerActivity.CPU,
                             ProfilerActivity.CUDA]) as prof:
        start.record()
        trainer.train_step()
        end.record()
        torch.cuda.synchronize()
    step_ms = start.elapsed_time(end)
    world = trainer.world
    if world.main:
        report(prof, step_ms, args.top)
    del trainer
    world.close()


def report(prof, step_ms: float, top: int) -> None:
    """Print the profiled step's GPU kernels and host ops."""
    # Ranges such as the optimizer's "Optimizer.step#..." span kernels
    # on the GPU's timeline too: counted, they would count those twice.
    annotations = {event.name for event in prof.events()
                   if event.is_user_annotation}
    averages = [event for event in prof.key_averages()
                if event.key not in annotations]
    events = [event for event in averages
              if event.device_type == torch.autograd.DeviceType.CUDA]
    events.sort(key=lambda event: event.self_device_time_total,
                reverse=True)
    total_us = sum(event.self_device_time_total for event in events)
    print(f"step {step_ms:.1f} ms wall, GPU kernels {total_us / 1e3:.1f} ms"
          f" ({total_us / 1e3 / step_ms:.0%} busy)")
    by_category = defaultdict(float)
    for event in events:
        by_category[group_of(event.key)] += event.self_device_time_total
    for label, us in sorted(by_category.items(), key=lambda item: -item[1]):
        print(f"  {label:26s} {us / 1e3:8.1f} ms {us / total_us:6.1%}")
    print(f"\ntop {top} kernels:")
    for event in events[:top]:
        print(f"  {event.self_device_time_total / 1e3:8.2f} ms "
              f"{event.count:5d}x  {event.key[:100]}")
    gaps = idle_gaps(kernel_spans(prof))
    print(f"\nidle between kernels: {sum(gap.ms for gap in gaps):.1f} ms "
          f"in {len(gaps)} stretches; the largest {top}:")
    for gap in gaps[:top]:
        print(f"  {gap.ms:8.2f} ms at {gap.at_ms:7.1f} ms  "
              f"{gap.before[:45]} -> {gap.after[:45]}")
    # Where the CPU spends the step: when the GPU waits (busy well under
    # 100%), the ops that launch its work are here.
    host = [event for event in averages
            if event.device_type == torch.autograd.DeviceType.CPU]
    host.sort(key=lambda event: event.self_cpu_time_total, reverse=True)
    total_us = sum(event.self_cpu_time_total for event in host)
    print(f"\nCPU: {total_us / 1e3:.1f} ms of ops' own time; top "
          f"{top}:")
    for event in host[:top]:
        print(f"  {event.self_cpu_time_total / 1e3:8.2f} ms "
              f"{event.count:5d}x  {event.key[:100]}")


if __name__ == "__main__":
    main()
