"""The ``coom`` command: train, prepare data, report.

Heavy modules are imported inside each command, so ``coom --help`` is
instant and tokenizer worker processes start light.
"""
import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import IO

from coom.errors import Adjusted, UserError

SET_HELP = ("override config fields, e.g. --set train.steps=200 "
            "model.hidden_size=256 (values are YAML)")


def _add_recipe_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "recipe", nargs="?", default=None,
        help="recipe name (tiny, small, ...) or a YAML file; "
        "default: tiny")
    parser.add_argument("--set", dest="overrides", nargs="+",
                        action="extend", default=[], metavar="KEY=VALUE",
                        help=SET_HELP)


def _first_process() -> bool:
    """Whether this is the first process of a torchrun launch, or the
    only one: it alone writes the run directory's own files."""
    return os.environ.get("RANK", "0") == "0"


def _resume_dir(args) -> Path:
    if args.recipe or args.run_dir or args.overwrite:
        raise UserError("--resume takes the recipe and run directory from "
                        "RUN_DIR; drop RECIPE, --run-dir and --overwrite")
    run_dir = Path(args.resume)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"--resume {run_dir}: not a run directory (no "
                        "config.yaml)")
    return run_dir


def _new_run_dir(args) -> tuple[Path, IO | None]:
    """The new run's directory, and its lock on the first process, which
    alone creates it (or empties it with --overwrite): under torchrun
    the others wait for it when they join the process group."""
    from coom.parallel.mesh import launched_world_size
    from coom.train.run_dir import LOCK, hold_lock
    if launched_world_size() > 1 and not args.run_dir:
        raise UserError("a run launched with torchrun needs its directory "
                        "named: pass --run-dir DIR")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = Path(args.recipe or "tiny").stem
    run_dir = Path(args.run_dir or f"runs/{name}-{stamp}")
    if not _first_process():
        return run_dir, None
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir} is a file; name a folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the run directory {run_dir} "
                        f"({error.strerror}); name a folder that can be "
                        "made") from None
    lock = hold_lock(run_dir)
    kept = [path for path in run_dir.iterdir() if path.name != LOCK]
    if kept and not args.overwrite:
        lock.close()
        raise UserError(f"run directory {run_dir} already exists; pass "
                        "--resume to continue it or --overwrite to "
                        "replace it")
    for path in kept:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return run_dir, lock


def _with_trainer(make_trainer, work):
    """work(trainer)'s result and the run's world, closed: the trainer
    (and any that work made) is freed first, so that the model, the
    optimizer and their process groups are gone before the world
    leaves its process group (``World.close``), also when work fails.
    make_trainer builds it here, so that no caller holds it."""
    trainer = make_trainer()
    world = trainer.world
    try:
        return work(trainer), world
    except BaseException as error:
        # The traceback's frames (work's among them) would keep the
        # trainer alive through the collection in world.close().
        traceback.clear_frames(error.__traceback__)
        raise
    finally:
        del trainer
        world.close()


def cmd_train(args) -> int:
    from coom.config import load_config
    from coom.train.run_dir import (
        hold_lock,
        read_config,
        record_run_info,
        write_config,
    )
    with contextlib.ExitStack() as held:
        if args.resume:
            run_dir = _resume_dir(args)
            if _first_process():
                held.enter_context(hold_lock(run_dir))
            config = read_config(run_dir, args.overrides)
        else:
            config = load_config(args.recipe or "tiny", args.overrides)
            run_dir, lock = _new_run_dir(args)
            if lock is not None:
                held.enter_context(lock)
                # Before the data is prepared, so that a run killed
                # then can be resumed.
                write_config(run_dir, config)
        if _first_process():
            record_run_info(run_dir)
        return _train_in(run_dir, config)


def _train_in(run_dir: Path, config) -> int:
    """Train config in run_dir, through its growths, and say how it
    ended."""
    from coom.train.trainer import Trainer

    def train(trainer):
        if trainer.world.main:
            print(f"training in {run_dir}")
        outcome = trainer.run()
        while outcome == "growth":
            trainer = Trainer(config, run_dir, trainer.world,
                              trainer.energy.job_started)
            outcome = trainer.run()
        return outcome, trainer.step, trainer.energy.summary()

    (outcome, step, energy), world = _with_trainer(
        lambda: Trainer(config, run_dir), train)
    if not world.main:
        return 0
    if outcome == "done":
        print(f"finished {step} steps; summary and plots: "
              f"coom report {run_dir}")
    else:
        print(f"stopped at step {step} ({outcome}) with a "
              f"checkpoint; continue with: {_relaunch()} --resume "
              f"{run_dir}")
    print(energy)
    return 0


def _relaunch() -> str:
    """The command that continues this launch's run: under torchrun, one
    that starts as many processes again."""
    from coom.parallel.mesh import launched_world_size
    processes = launched_world_size()
    if processes == 1:
        return "coom train"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", processes))
    nodes = processes // per_node
    spread = (f" --nnodes {nodes} (with this launch's rendezvous options)"
              if nodes > 1 else "")
    return f"torchrun{spread} --nproc-per-node {per_node} -m coom train"


def cmd_data_prepare(args) -> int:
    from coom.config import load_config
    from coom.data.prepare import prepare
    config = load_config(args.recipe or "tiny", args.overrides)
    prepared = prepare(config.data)
    print(f"tokenizer: {prepared.tokenizer.path} "
          f"({prepared.tokenizer.vocab_size} tokens)")
    for prefix in prepared.prefixes:
        print(f"dataset: {prefix}.bin / .idx")
    return 0


def _checkpoint_to_evaluate(run_dir: Path, step) -> Path:
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.yaml)")
    from coom.checkpoint.storage import is_checkpoint, latest_checkpoint
    folder = run_dir / "checkpoints"
    if step is None:
        path = latest_checkpoint(folder)
        if path is None:
            raise UserError(f"{run_dir} holds no checkpoint yet")
        return path
    path = folder / f"step_{step:07d}"
    if not is_checkpoint(path):
        kept = sorted(p.name for p in folder.glob("step_*")
                      if is_checkpoint(p))
        raise UserError(f"{run_dir} holds no checkpoint of step {step}; "
                        f"it holds {', '.join(kept) or 'none'}")
    return path


def cmd_eval(args) -> int:
    from coom.train.run_dir import read_config
    run_dir = Path(args.run_dir)
    path = _checkpoint_to_evaluate(run_dir, args.step)
    config = read_config(run_dir, args.overrides)
    from coom.train.trainer import Trainer

    def evaluate(trainer):
        trainer.restore(path)
        return trainer.evaluate(trainer.valid)

    loss, world = _with_trainer(lambda: Trainer(config, run_dir), evaluate)
    if not world.main:
        return 0
    train = config.train
    print(f"{path}: validation loss {loss:.4f} (perplexity "
          f"{math.exp(loss):.2f}) over {train.eval_iters} micro-batches of "
          f"{train.micro_batch_size} x {config.data.seq_length} tokens")
    if args.out:
        Path(args.out).write_text(json.dumps(
            {"checkpoint": str(path), "val_loss": loss,
             "overrides": args.overrides}) + "\n")
        print(f"written to {args.out}")
    return 0


def cmd_report(args) -> int:
    from coom.train.report import write_report
    summary = write_report(Path(args.run_dir))
    print(summary.read_text())
    print(f"report written to {summary.parent}")
    return 0


def cmd_model_info(args) -> int:
    from dataclasses import replace

    from coom.config import load_config
    from coom.models.info import describe
    config = load_config(args.recipe or "tiny", args.overrides)
    model = config.model
    note = ""
    if model.vocab_size is None:
        model = replace(model, vocab_size=config.data.tokenizer_vocab_size)
        note = (f" (vocabulary: the tokenizer's "
                f"{model.vocab_size} tokens)")
    print(f"recipe {args.recipe or 'tiny'}{note}")
    print(describe(model, config.data.seq_length))
    return 0


def cmd_convert(args) -> int:
    from coom.interop import convert
    source, out = Path(args.source), Path(args.out)
    if args.to == "hf":
        convert.to_hf(source, out, args.overwrite)
        print(f"wrote {out}: load it with transformers."
              "AutoModelForCausalLM.from_pretrained")
    else:
        recipe, defaults = convert.from_hf(source, out, args.overwrite)
        print(f"wrote {out}; continue training with: coom train {recipe}")
        if defaults:
            fields = ", ".join(f"model.{name}={value}"
                               for name, value in defaults.items())
            print(f"{source}/config.json holds no COOM training settings; "
                  f"the recipe takes COOM's defaults {fields} (change "
                  "them with --set)")
    return 0


def cmd_grow(args) -> int:
    from coom.growth.offline import grow_folder, parse_op
    ops = [parse_op(words) for words in args.op]
    recipe = grow_folder(Path(args.source), Path(args.out), ops, args.seed,
                         args.overwrite)
    print(f"wrote {args.out}; train the grown model with: coom train "
          f"{recipe}")
    return 0


def cmd_experts_rebalance(args) -> int:
    from coom.tools.rebalance import REBALANCED, rebalance_run
    run_dir = Path(args.run_dir)
    plans = rebalance_run(run_dir, args.ranks, args.redundant,
                          args.dry_run)
    print(f"busiest of {args.ranks} expert-parallel ranks over the mean, "
          "by MoE layer (measured load):")
    for plan in plans:
        fetched = ""
        if plan.placement is not None:
            fetched = (f" ({plan.fetched()} of {plan.placement.slots} "
                       "slots fetch their weights from another rank)")
        print(f"  layer {plan.index}: {plan.before:.3f} -> "
              f"{plan.after:.3f}{fetched}")
    if args.dry_run:
        print("dry run: nothing written")
    else:
        changed = [] if all(plan.order == sorted(plan.order)
                            for plan in plans) else ["renumbered"]
        if args.redundant:
            changed.append("with the copies' placement")
        changes = "".join(f"{change}, " for change in changed)
        print(f"wrote the latest checkpoint {changes}as the "
              f"run's latest (step_N{REBALANCED}); continue with: coom "
              f"train --resume {run_dir} --set "
              f"parallel.expert={args.ranks}")
    return 0


def cmd_generate(args) -> int:
    import torch

    from coom.data.tokenizer import Tokenizer
    from coom.inference import generate
    from coom.interop.weights import build_model, read_weights
    from coom.models.info import model_info
    from coom.train.trainer import resolve_device
    if args.speculative and args.temperature != 0:
        raise UserError("--speculative decodes greedily; add "
                        "--temperature 0")
    generate.check_sampling(args.temperature, args.top_p)
    weights = read_weights(args.source)
    if weights.tokenizer is None:
        raise UserError(f"{args.source} comes with no tokenizer.json to "
                        "encode the prompt")
    tokenizer = Tokenizer(weights.tokenizer, weights.eod_token)
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(weights, device, dtype)
    prompt = tokenizer.encode(args.prompt)
    absorbed = not args.expanded
    if args.speculative:
        out = generate.generate_speculative(
            model, prompt, args.max_new_tokens, tokenizer.eod, absorbed)
    else:
        out = generate.generate(
            model, prompt, args.max_new_tokens, args.temperature,
            args.top_p, args.seed, tokenizer.eod, absorbed)
    print(tokenizer.decode(prompt + out.tokens))
    info = model_info(weights.config, 1)
    positions = len(prompt) + len(out.tokens) - 1
    per_token = out.cache_bytes // positions
    mha = info.mha_cache_values_per_token * dtype.itemsize
    print(f"{len(out.tokens)} tokens in {out.seconds:.2f} s "
          f"({len(out.tokens) / out.seconds:.1f} tokens/s); KV cache "
          f"{out.cache_bytes:,} bytes, {per_token:,} bytes per token "
          f"(multi-head attention: {mha:,})", file=sys.stderr)
    if args.speculative:
        rate = out.accepted / max(out.drafted, 1)
        print(f"MTP drafts accepted: {out.accepted} of {out.drafted} "
              f"({rate:.0%})", file=sys.stderr)
    return 0


def cmd_energy_sweep(args) -> int:
    from coom.config import load_config
    from coom.tools import sweep
    from coom.tools.bench import write_result
    if args.eta is None:
        args.eta = 0.5
    if not 0 <= args.eta <= 1:
        raise UserError(f"--eta must lie in [0, 1], got {args.eta}")
    if args.max_power is not None and args.max_power <= 0:
        raise UserError("--max-power must be positive (watts)")
    recipe = args.recipe or "tiny"
    out = Path(args.recipe_out
               or f"energy-sweep-{Path(recipe).stem}.yaml")
    if out.exists():
        raise UserError(f"--recipe-out {out} already exists; name another "
                        "file or remove it")
    config = load_config(recipe, args.overrides)
    axes = sweep.parse_axes(args.vary, recipe, args.overrides) \
        if args.vary else sweep.default_axes(config)
    rows = sweep.run_sweep(recipe, args.overrides, axes, args.grid,
                           args.steps, args.warmup, args.real_data)
    choice = sweep.choose(rows, args.eta, args.max_power)
    print(sweep.describe_sweep(rows, choice))
    if choice is not None:
        out.write_text(sweep.recipe_text(recipe, args.overrides, choice,
                                         rows[0]))
        print(f"best setting written to {out}; train with: coom train "
              f"{out}")
    if args.out:
        front = [sweep.label(r["overrides"]) for r in choice.front] \
            if choice else []
        best = sweep.label(choice.best["overrides"]) if choice else None
        write_result({"recipe": recipe, "eta": args.eta, "front": front,
                      "best": best, "candidates": rows}, Path(args.out))
        print(f"figures written to {args.out}")
    return 0


def cmd_bench(args) -> int:
    from coom.config import load_config
    from coom.tools.bench import describe, run_bench, write_result
    if args.steps < 1 or args.warmup < 0:
        raise UserError("--steps must be at least 1 and --warmup at least 0")
    if args.energy_sweep:
        return cmd_energy_sweep(args)
    given = [option for option, value in (
        ("--vary", args.vary), ("--grid", args.grid),
        ("--eta", args.eta is not None), ("--max-power", args.max_power),
        ("--recipe-out", args.recipe_out)) if value]
    if given:
        raise UserError(f"{', '.join(given)} belong to --energy-sweep; add "
                        "it, or leave them out")
    config = load_config(args.recipe or "tiny", args.overrides)
    result = run_bench(config, args.steps, args.warmup, args.real_data)
    result["recipe"] = args.recipe or "tiny"
    print(describe(result))
    if args.out:
        write_result(result, Path(args.out))
        print(f"figures written to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coom", description="Pretrain DeepSeek-V3-style models.")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of input errors")
    commands = parser.add_subparsers(dest="command", required=True,
                                     metavar="COMMAND")

    train = commands.add_parser(
        "train", help="train a model from a recipe",
        description="Train a model. Writes config.yaml, metrics.jsonl, "
        "TensorBoard events and checkpoints to the run directory.")
    _add_recipe_options(train)
    train.add_argument("--run-dir", metavar="DIR",
                       help="run directory (default: runs/RECIPE-TIMESTAMP)")
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue the run in RUN_DIR from its latest "
                       "checkpoint, with its config plus any --set")
    train.add_argument("--overwrite", action="store_true",
                       help="delete an existing run directory first")
    train.set_defaults(handler=cmd_train)

    data = commands.add_parser(
        "data", help="prepare training data",
        description="Data commands.").add_subparsers(
            dest="data_command", required=True, metavar="COMMAND")
    data_prepare = data.add_parser(
        "prepare", help="tokenize a recipe's data sources",
        description="Train or load the tokenizer and write each text "
        "source of the recipe's data section as a Megatron indexed dataset "
        "in data.cache_dir; unchanged sources are reused.")
    _add_recipe_options(data_prepare)
    data_prepare.set_defaults(handler=cmd_data_prepare)

    model = commands.add_parser(
        "model", help="describe a recipe's model",
        description="Model commands.").add_subparsers(
            dest="model_command", required=True, metavar="COMMAND")
    model_info = model.add_parser(
        "info", help="parameters, FLOPs per token and KV cache size",
        description="Print a recipe's total and active parameters, "
        "training FLOPs per token at its sequence length, and the bytes "
        "per token of MLA's compressed KV cache against multi-head "
        "attention of the same shape. Builds nothing in memory.")
    _add_recipe_options(model_info)
    model_info.set_defaults(handler=cmd_model_info)

    convert = commands.add_parser(
        "convert", help="convert checkpoints to and from Hugging Face",
        description="--to hf: write a run's latest checkpoint (or a "
        "checkpoint folder) as a Hugging Face DeepseekV3 folder "
        "(DeepseekV2 for softmax routing; model.safetensors, config.json, "
        "tokenizer.json). --from hf: import a Hugging Face DeepseekV3 or "
        "DeepseekV2 folder as a COOM checkpoint "
        "folder with a recipe.yaml that continues training it.")
    direction = convert.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to", choices=["hf"],
                           help="convert a COOM run or checkpoint")
    direction.add_argument("--from", dest="from_", choices=["hf"],
                           help="import a Hugging Face folder")
    convert.add_argument("source", metavar="SOURCE",
                         help="run directory, checkpoint folder, or (with "
                         "--from hf) Hugging Face folder")
    convert.add_argument("out", metavar="OUT", help="folder to write")
    convert.add_argument("--overwrite", action="store_true",
                         help="replace OUT if it exists")
    convert.set_defaults(handler=cmd_convert)

    grow = commands.add_parser(
        "grow", help="grow a model offline, keeping what it computes",
        description="Apply growth operators (docs/growth.md) to a model "
        "and write it as a checkpoint folder with a recipe that trains "
        "it. To grow while training, use the recipe's growth.schedule.")
    grow.add_argument("source", metavar="SOURCE",
                      help="run directory, checkpoint folder or Hugging "
                      "Face folder")
    grow.add_argument("out", metavar="OUT", help="folder to write")
    grow.add_argument("--op", nargs="+", action="append", required=True,
                      metavar="WORD", help="an operator and its arguments, "
                      "e.g. --op depth num_layers=8; repeat to apply "
                      "several in order")
    grow.add_argument("--seed", type=int, default=0,
                      help="seed of the new weights")
    grow.add_argument("--overwrite", action="store_true",
                      help="replace OUT if it exists")
    grow.set_defaults(handler=cmd_grow)

    generate = commands.add_parser(
        "generate", help="sample text from a model",
        description="Continue a prompt with a trained model, decoding with "
        "MLA's compressed KV cache (latents and rope keys only).")
    generate.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                          help="run directory, checkpoint folder or Hugging "
                          "Face folder (with tokenizer.json)")
    generate.add_argument("--prompt", required=True, help="text to continue")
    generate.add_argument("--max-new-tokens", type=int, default=64,
                          help="most tokens to add (default: 64)")
    generate.add_argument("--temperature", type=float, default=0.8,
                          help="0 decodes greedily (default: 0.8)")
    generate.add_argument("--top-p", type=float, default=0.95,
                          help="sample from the smallest set of tokens "
                          "whose probability reaches this (default: 0.95)")
    generate.add_argument("--seed", type=int, default=0,
                          help="sampling seed (default: 0)")
    generate.add_argument("--speculative", action="store_true",
                          help="draft with the first MTP depth and verify "
                          "(greedy only); prints the acceptance rate")
    generate.add_argument("--expanded", action="store_true",
                          help="expand cached latents to keys and values "
                          "instead of the absorbed attention")
    generate.add_argument("--device", default="auto",
                          help="cpu, cuda, cuda:N or auto (default)")
    generate.set_defaults(handler=cmd_generate)

    bench = commands.add_parser(
        "bench", help="time a recipe's training steps",
        description="Train a recipe for a few steps (on random tokens "
        "unless --real-data) and report tokens/s, model FLOPs "
        "utilisation, peak memory and, on GPUs, energy per token.")
    _add_recipe_options(bench)
    bench.add_argument("--steps", type=int, default=10,
                       help="timed steps (default: 10)")
    bench.add_argument("--warmup", type=int, default=3,
                       help="untimed steps first (default: 3)")
    bench.add_argument("--real-data", action="store_true",
                       help="train on the recipe's data, not random tokens")
    bench.add_argument("--out", metavar="FILE",
                       help="also write the figures as JSON")
    sweep = bench.add_argument_group(
        "energy sweep", "--energy-sweep measures J/token and tokens/s for "
        "candidate settings (micro-batch size, recomputation, compile, "
        "kernels, FP8; "
        "never hardware settings), prints their Pareto front and writes "
        "the one of least Zeus cost, eta * energy + (1 - eta) * "
        "max_power * time, as a recipe (docs/energy.md)")
    sweep.add_argument("--energy-sweep", action="store_true",
                       help="sweep settings instead of one measurement")
    sweep.add_argument("--vary", nargs="+", action="extend", default=[],
                       metavar="KEY=V1,V2",
                       help="a setting and its values to try, e.g. "
                       "train.micro_batch_size=2,4,8 (default: "
                       "micro-batch size halved and doubled, and on GPUs "
                       "recomputation, compile, kernels and FP8 flipped)")
    sweep.add_argument("--grid", action="store_true",
                       help="try every combination, not one setting at a "
                       "time")
    sweep.add_argument("--eta", type=float,
                       help="weight of energy against time, 0 to 1 "
                       "(default: 0.5)")
    sweep.add_argument("--max-power", type=float, metavar="WATTS",
                       help="price of time in the cost (default: NVML's "
                       "power limit)")
    sweep.add_argument("--recipe-out", metavar="FILE",
                       help="where to write the best setting (default: "
                       "energy-sweep-RECIPE.yaml); never overwritten")
    bench.set_defaults(handler=cmd_bench)

    experts = commands.add_parser(
        "experts", help="expert placement",
        description="Expert commands.").add_subparsers(
            dest="experts_command", required=True)
    rebalance = experts.add_parser(
        "rebalance", help="renumber a run's experts to balance expert "
        "parallelism",
        description="Plan a placement of each MoE layer's routed experts "
        "on the expert-parallel ranks from the load the run measured "
        "since its last rebalance, and apply it to the run's latest "
        "checkpoint by renumbering the experts, with --redundant also "
        "placing copies of hot experts (nothing the model computes "
        "changes). The run then resumes from the rebalanced checkpoint "
        "(docs/distributed.md).")
    rebalance.add_argument("run_dir", metavar="RUN_DIR",
                           help="a run directory written by coom train")
    rebalance.add_argument("--ranks", type=int, required=True,
                           help="expert-parallel ranks to balance "
                           "(parallel.expert of the resumed run)")
    rebalance.add_argument("--redundant", type=int, default=0,
                           metavar="N",
                           help="extra expert slots per MoE layer for "
                           "copies of hot experts, a multiple of --ranks "
                           "(default 0: renumbering only)")
    rebalance.add_argument("--dry-run", action="store_true",
                           help="report the plan, write nothing")
    rebalance.set_defaults(handler=cmd_experts_rebalance)

    evaluate = commands.add_parser(
        "eval", help="evaluate a run's checkpoint",
        description="Evaluate a checkpoint of RUN_DIR (its latest unless "
        "--step) on the run's validation data, with the run's config plus "
        "any --set (fp8.recipe=off, say, to see what FP8 changes; "
        "train.eval_iters for more of the validation data), as Megatron's "
        "--skip-train does. The run itself is not changed. Runs under "
        "torchrun too.")
    evaluate.add_argument("run_dir", metavar="RUN_DIR",
                          help="a run directory written by coom train")
    evaluate.add_argument("--step", type=int, metavar="N",
                          help="the checkpoint of step N")
    evaluate.add_argument("--set", dest="overrides", nargs="+",
                          action="extend", default=[],
                          metavar="KEY=VALUE", help=SET_HELP)
    evaluate.add_argument("--out", metavar="FILE",
                          help="also write the loss as JSON to FILE")
    evaluate.set_defaults(handler=cmd_eval)

    report = commands.add_parser(
        "report", help="plot and summarise a run",
        description="Write loss, throughput and learning-rate plots and a "
        "markdown summary to RUN_DIR/report.")
    report.add_argument("run_dir", metavar="RUN_DIR",
                        help="a run directory written by coom train")
    report.set_defaults(handler=cmd_report)
    return parser


def _recipe_after_set(args) -> None:
    """Take the recipe back from --set, whose list swallows a recipe name
    written after it (coom train --set train.steps=4 tiny)."""
    overrides = getattr(args, "overrides", [])
    if (getattr(args, "recipe", "") is None and overrides
            and "=" not in overrides[-1]):
        args.recipe = overrides.pop()


def _show_adjusted(message, category, filename, lineno, file=None,
                   line=None):
    """Warnings print as one coom line on the first process only; other
    warnings keep Python's form."""
    if not issubclass(category, Adjusted):
        return _python_showwarning(message, category, filename, lineno,
                                   file, line)
    if _first_process():
        print(f"coom: warning: {message}", file=sys.stderr)


_python_showwarning = warnings.showwarning


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _recipe_after_set(args)
    warnings.showwarning = _show_adjusted
    try:
        return args.handler(args)
    except UserError as error:
        if args.debug:
            raise
        # Under torchrun each process meets it; one line says it.
        if _first_process():
            print(f"coom: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("coom: interrupted", file=sys.stderr)
        return 130
