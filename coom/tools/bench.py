"""``coom bench``: time a recipe's training steps.

It builds the recipe's trainer (on random tokens unless asked for the
recipe's data), evaluates once as ``coom train`` does at step 0 (so that
``torch.compile`` first meets the model under no_grad, as in a run), runs
warm-up steps, then times the measured steps with the device
synchronised around them, and reports tokens/s, model FLOPs
utilisation (analytic training FLOPs per token, ``coom.models.info``) over
the GPU's dense bf16 peak and over a measured matmul ceiling, peak memory,
energy per token from the meters that can be read here (GPU: NVML's
counter; CPU packages: RAPL; ``coom.energy.meter``), and, compiled, the
graph breaks torch.compile met and the frames it gave up whole: each
leaves part of a block, or all of it, to eager PyTorch.
"""
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from coom.config import RunConfig
from coom.energy.meter import LABELS, open_meter
from coom.energy.nvml import enforced_power_limit
from coom.fp8.filter import describe as describe_fp8
from coom.models.info import model_info
from coom.tools.profile import describe_profile, profile_step
from coom.train.trainer import Trainer, compile_misses

# Dense bf16 peaks (no sparsity) of GPUs, in FLOP/s, by name.
PEAK_BF16 = {"H100 SXM": 989e12, "H100 80GB HBM3": 989e12,
             "H200": 989e12, "H100 PCIe": 756e12, "A100": 312e12}


def _peak_flops(device: torch.device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name),
                None)


def matmul_ceiling(device: torch.device, size: int = 8192,
                   repeats: int = 20) -> float:
    """Measured FLOP/s of a large bf16 matrix product on random data."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1000 / repeats
    return 2 * size ** 3 / seconds


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_config(config: RunConfig, steps: int, warmup: int,
                 real_data: bool) -> RunConfig:
    """config set up for timing: enough steps, no evaluation within them,
    and random tokens unless real_data."""
    total = steps + warmup
    config = replace(
        config,
        train=replace(config.train, steps=total, eval_interval=total),
        schedule=replace(config.schedule, lr_warmup_iters=min(
            config.schedule.lr_warmup_iters, total),
            lr_wsd_decay_iters=None),
        logging=replace(config.logging, tensorboard=False))
    if not real_data:
        model = config.model
        if model.vocab_size is None:
            model = replace(model,
                            vocab_size=config.data.tokenizer_vocab_size)
        config = replace(config, model=model,
                         data=replace(config.data, synthetic=True))
    return config


@dataclass
class _Timing:
    """What the timed steps of a bench measured."""

    config: RunConfig
    device: torch.device
    seconds: list[float]
    losses: list[float]
    joules: dict
    unmetered: list
    """Why no meter read energy, where none did."""

    misses: list[int]
    """torch.compile's graph breaks and frames left eager."""

    profile: Optional[dict]
    """One more step's breakdown (``coom.tools.profile``), if asked."""


def _time_steps(config: RunConfig, steps: int, warmup: int,
                profile: bool) -> _Timing:
    """Train warmup steps, then time steps more, each to its end on the
    device, then (profile) profile one more."""
    # On a terminal a bar shows the steps, which on a CPU take minutes.
    bar = tqdm(total=warmup + steps, desc="warm-up", unit="step",
               disable=None)
    with tempfile.TemporaryDirectory() as run_dir, bar:
        misses = compile_misses()
        trainer = Trainer(config, Path(run_dir))
        if trainer.parallel.fp8_choices:
            bar.write(describe_fp8(trainer.parallel.fp8_choices))
        device = trainer.device
        trainer.evaluate(trainer.data.valid)
        for _ in range(warmup):
            trainer.train_step()
            bar.update()
        _synchronize(device)
        bar.set_description("timed")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        meter = open_meter(device, machine_leader=True)
        seconds, losses = [], []
        for _ in range(steps):
            started = time.perf_counter()
            metrics = trainer.train_step()
            _synchronize(device)
            seconds.append(time.perf_counter() - started)
            losses.append(metrics["loss"])
            bar.update()
        joules = meter.read()
        misses = [now - before for now, before
                  in zip(compile_misses(), misses)]
        profiled = profile_step(trainer).as_dict() if profile else None
    return _Timing(trainer.config, device, seconds, losses, joules,
                   meter.reasons, misses, profiled)


def _device_figures(device: torch.device, achieved: float) -> dict:
    """MFU against the device's peak and its matmul ceiling, its peak
    memory and power limit, where known."""
    result = {}
    peak = _peak_flops(device)
    if peak is not None:
        result["mfu"] = achieved / peak
        result["peak_tflops"] = peak / 1e12
    if device.type == "cuda":
        ceiling = matmul_ceiling(device)
        result["matmul_ceiling_tflops"] = ceiling / 1e12
        result["mfu_of_matmul_ceiling"] = achieved / ceiling
        result["peak_memory_gib"] = \
            torch.cuda.max_memory_allocated(device) / 2 ** 30
        limit = enforced_power_limit(device)
        if limit is not None:
            result["power_limit_w"] = limit
    return result


def _energy_figures(timing: _Timing, tokens: int) -> dict:
    if not timing.joules:
        return {"energy_unmetered": timing.unmetered}
    total = sum(timing.joules.values())
    return {"joules_per_token": total / tokens,
            "average_watts": total / sum(timing.seconds),
            "joules_per_token_by_source": {
                source: value / tokens
                for source, value in timing.joules.items()}}


def run_bench(config: RunConfig, steps: int = 10, warmup: int = 3,
              real_data: bool = False, profile: bool = False) -> dict:
    """Train warmup + steps steps of config and return the figures; with
    profile, also the breakdown of one more step."""
    timing = _time_steps(bench_config(config, steps, warmup, real_data),
                         steps, warmup, profile)
    config, device = timing.config, timing.device
    tokens = config.train.global_batch_size * config.data.seq_length
    info = model_info(config.model, config.data.seq_length)
    tokens_per_s = tokens * steps / sum(timing.seconds)
    achieved = tokens_per_s * info.training_flops_per_token
    result = {
        "device": (torch.cuda.get_device_name(device)
                   if device.type == "cuda" else "cpu"),
        "micro_batch_size": config.train.micro_batch_size,
        "global_batch_size": config.train.global_batch_size,
        "seq_length": config.data.seq_length,
        "compile": config.train.compile,
        "kernels": config.train.kernels,
        "fp8_recipe": config.fp8.recipe,
        "steps": steps, "warmup": warmup,
        "step_seconds_median": statistics.median(timing.seconds),
        "tokens_per_s": tokens_per_s,
        "flops_per_token": info.training_flops_per_token,
        "achieved_tflops": achieved / 1e12,
        "loss_first": timing.losses[0], "loss_last": timing.losses[-1],
    }
    if config.train.compile:
        result["graph_breaks"], result["frames_left_eager"] = timing.misses
    if timing.profile is not None:
        result["profile"] = timing.profile
    return result | _device_figures(device, achieved) \
        | _energy_figures(timing, tokens * steps)


def _rate(tflops: float) -> str:
    """A FLOP rate in TFLOP/s, or GFLOP/s below one TFLOP/s (a CPU's)."""
    if tflops >= 1:
        return f"{tflops:.1f} TFLOP/s"
    return f"{tflops * 1e3:.1f} GFLOP/s"


def describe(result: dict) -> str:
    """The lines ``coom bench`` prints."""
    lines = [f"{result['device']}: batch {result['global_batch_size']} x "
             f"{result['seq_length']} tokens, compile "
             f"{'on' if result['compile'] else 'off'}, "
             f"{result['steps']} timed steps after {result['warmup']}",
             f"tokens/s          {result['tokens_per_s']:,.0f}",
             f"step time         {result['step_seconds_median'] * 1e3:.1f} "
             "ms (median)",
             f"model FLOPs       {_rate(result['achieved_tflops'])} "
             f"({result['flops_per_token'] / 1e9:.3f} GFLOP per token)"]
    if "mfu" in result:
        lines.append(f"MFU               {result['mfu']:.1%} of "
                     f"{result['peak_tflops']:.0f} TFLOP/s peak, "
                     f"{result['mfu_of_matmul_ceiling']:.1%} of the "
                     f"measured matmul ceiling "
                     f"{result['matmul_ceiling_tflops']:.0f} TFLOP/s")
    if "peak_memory_gib" in result:
        lines.append(f"peak memory       {result['peak_memory_gib']:.1f} "
                     "GiB")
    if "joules_per_token" in result:
        sources = ", ".join(
            f"{LABELS[source]} {value:.4f}" for source, value in
            result["joules_per_token_by_source"].items())
        lines.append(f"energy            {result['joules_per_token']:.4f} "
                     f"J per token ({result['average_watts']:.0f} W; "
                     f"{sources})")
    else:
        reasons = "; ".join(f"{LABELS[source]}: {reason}" for source,
                            reason in result["energy_unmetered"].items())
        lines.append(f"energy            not measured ({reasons})")
    if "graph_breaks" in result:
        misses = result["graph_breaks"] + result["frames_left_eager"]
        lines.append(f"torch.compile     {result['graph_breaks']} graph "
                     f"breaks, {result['frames_left_eager']} frames left "
                     "eager" + (" (TORCH_LOGS=graph_breaks shows where)"
                                if misses else ""))
    lines.append(f"loss              {result['loss_first']:.3f} -> "
                 f"{result['loss_last']:.3f}")
    if "profile" in result:
        lines += describe_profile(result["profile"])
    return "\n".join(lines)


def write_result(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
