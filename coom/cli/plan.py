"""``coom plan``: a run's memory per GPU, predicted on a CPU."""
from coom.errors import UserError

GIB = 2 ** 30


def _gib(count: int) -> str:
    return f"{count / GIB:9.2f} GiB"


def cmd_plan(args) -> int:
    from coom.config import load_config
    from coom.parallel.mesh import degrees
    from coom.plan.gpus import gpu_named
    from coom.plan.plan import make_plan
    from coom.plan.ranks import as_on_gpu
    if args.calibrate:
        return _calibrate(args.gpu)
    from coom.plan.step_time import GPUS_PER_NODE
    if args.gpus < 1:
        raise UserError(f"--gpus {args.gpus}: give one or more")
    if args.gpus > GPUS_PER_NODE and args.gpus % GPUS_PER_NODE:
        raise UserError(f"--gpus {args.gpus}: the plan counts nodes of "
                        f"{GPUS_PER_NODE}; give whole nodes beyond one")
    gpu = gpu_named(args.gpu or "h100")
    read = load_config(args.recipe or "tiny", args.overrides)
    if args.search:
        return _search(args, read, gpu)
    config = as_on_gpu(read, gpu.memory)
    plan = make_plan(config, args.gpus, gpu)
    parallel, train = config.parallel, config.train
    shard = degrees(parallel, args.gpus)["dp_shard"]
    print(f"recipe {args.recipe or 'tiny'} on {args.gpus} x {gpu.name} "
          f"({gpu.memory / GIB:.1f} GiB each): pipeline "
          f"{parallel.pipeline}, data_parallel_replicate "
          f"{parallel.data_parallel_replicate}, data_parallel_shard "
          f"{shard}, tensor {parallel.tensor}, "
          f"expert {parallel.expert}; micro-batch "
          f"{train.micro_batch_size}, global batch "
          f"{train.global_batch_size}, recompute {train.recompute}, "
          f"{train.precision}")
    _print_memory(plan, config, args.gpus, gpu)
    _print_time(plan)
    return 0


def _print_memory(plan, config, gpus: int, gpu) -> None:
    from dataclasses import replace

    from coom.plan.fit import ALLOCATOR_OVERHEAD, CONTEXT_BYTES, needed
    from coom.plan.memory import memory_plan
    plans, top = plan.memory, plan.fullest
    print(f"process {top.rank} (pipeline rank {top.pipeline_rank}), "
          "the fullest, at its peak:")
    for term in top.terms:
        print(f"  {term.name:<22}{_gib(term.bytes)}  {term.note}")
    print(f"  {'allocated':<22}{_gib(top.peak)}")
    if top.worst_routing:
        print(f"  {'worst routing':<22}{_gib(top.worst_routing)}  more, "
              "if every expert-parallel process sent each token's copies "
              "to this one's experts (dropless routing: nothing caps it)")
    if len(plans) > 1:
        print("by pipeline rank: " + ", ".join(
            f"{rank.pipeline_rank}: {rank.peak / GIB:.1f}"
            for rank in plans) + " GiB")
    modes = []
    for mode in ("none", "selective", "full"):
        other = replace(config, train=replace(config.train, recompute=mode))
        peak = top.peak if mode == config.train.recompute else max(
            rank.peak for rank in memory_plan(other, gpus,
                                              holdings=plan.holdings))
        modes.append(f"{mode} {peak / GIB:.1f}")
    print(f"allocated by train.recompute: {', '.join(modes)} GiB")
    need = needed(top.peak)
    verdict = "fits" if need <= gpu.memory else "does NOT fit"
    print(f"with the allocator's usual {ALLOCATOR_OVERHEAD:.0%} and "
          f"{CONTEXT_BYTES / GIB:.1f} GiB of CUDA context: "
          f"{need / GIB:.1f} of {gpu.memory / GIB:.1f} GiB, {verdict}")


def _launch(recipe: str, gpus: int) -> str:
    """The command that starts recipe on gpus GPUs, in nodes of 8 as
    the plan counts them."""
    from coom.plan.step_time import GPUS_PER_NODE
    if gpus == 1:
        return f"coom train {recipe}"
    nodes, spread = gpus // GPUS_PER_NODE, ""
    if nodes > 1:
        spread = f"--nnodes {nodes} (with your rendezvous options) "
    return (f"torchrun {spread}--nproc-per-node {min(gpus, GPUS_PER_NODE)}"
            f" -m coom train {recipe} --run-dir runs/{recipe}-{gpus}")


def _search(args, config, gpu) -> int:
    """Print the fastest settings that fit, with their commands."""
    from coom.plan.search import search
    recipe = args.recipe or "tiny"
    found = search(config, args.gpus, gpu)
    if not found:
        print(f"no layout, micro-batch size or recompute mode of {recipe} "
              f"fits {args.gpus} x {gpu.name}; plan more GPUs")
        return 0
    print(f"{len(found)} settings fit; the fastest, by the plan:")
    for candidate in found[:5]:
        plan = candidate.plan
        sets = _merged(args.overrides, candidate.overrides)
        command = _launch(recipe, args.gpus) + (
            f" --set {' '.join(sets)}" if sets else "")
        print(f"  {plan.time.tokens_per_second:>12,.0f} tokens/s, MFU "
              f"{plan.time.mfu:.1%}, {plan.fullest.peak / GIB:.1f} GiB: "
              f"{command}")
    return 0


def _merged(overrides, chosen) -> list[str]:
    """overrides, less those of the keys chosen sets, then chosen."""
    keys = {override.split("=", 1)[0] for override in chosen}
    return [override for override in overrides
            if override.split("=", 1)[0] not in keys] + list(chosen)


def _calibrate(name) -> int:
    """Measure this machine's GPU and keep its rates for later plans."""
    import torch

    from coom.plan.calibrate import calibrate
    from coom.plan.ceilings import save
    from coom.plan.gpus import gpu_named, kind_of
    if not torch.cuda.is_available():
        raise UserError("--calibrate measures the GPU it runs on; this "
                        "machine has none")
    device = torch.device("cuda")
    if name is not None:
        name = gpu_named(name).name
    else:
        found = torch.cuda.get_device_name(device)
        name = kind_of(found)
        if name is None:
            raise UserError(f"--calibrate: name the kind of the "
                            f"{found.lower()} with --gpu")
    ceilings = calibrate(name, device)
    path = save(ceilings)
    for kind, rate in ceilings.rates.items():
        unit = "TB/s" if kind == "memory" else "TFLOP/s"
        print(f"  {kind:<16}{rate / 1e12:8.1f} {unit}")
    print(f"  {'launch':<16}{ceilings.launch * 1e6:8.1f} us")
    print(f"written to {path}; coom plan --gpu {name} uses it")
    return 0


def _print_time(plan) -> None:
    time = plan.time
    print(f"step time {time.seconds * 1e3:.1f} ms: "
          f"{time.tokens_per_second:,.0f} tokens/s, MFU {time.mfu:.1%} "
          f"(rates: {plan.ceilings.source})")
    for part, seconds in time.parts.items():
        print(f"  {part:<28}{seconds * 1e3:9.1f} ms")
