"""``coom train`` and ``coom eval``: the commands that drive a Trainer
over a run directory."""
import contextlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import IO

from coom.cli.torchrun import first_process, relaunch
from coom.errors import UserError


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
    if not first_process():
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


def _auto_resume(args) -> None:
    """With --auto-resume, turn a start over a run directory that holds
    a run into its resume. Under torchrun every process decides alone:
    one that sees the config.yaml another just wrote reads back the same
    config."""
    if not args.auto_resume:
        return
    if not args.run_dir or args.resume or args.overwrite:
        raise UserError("--auto-resume needs --run-dir, and neither "
                        "--resume nor --overwrite")
    if (Path(args.run_dir) / "config.yaml").is_file():
        args.resume, args.recipe, args.run_dir = args.run_dir, None, None


def cmd_train(args) -> int:
    from coom.checkpoint.storage import set_aside_damaged
    from coom.config import load_config
    from coom.train.run_dir import (
        hold_lock,
        read_config,
        record_run_info,
        write_config,
    )
    _auto_resume(args)
    with contextlib.ExitStack() as held:
        if args.resume:
            run_dir = _resume_dir(args)
            if first_process():
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
        if first_process():
            record_run_info(run_dir)
            # Before the processes join, so that none reads a damaged
            # checkpoint meanwhile.
            for line in set_aside_damaged(run_dir / "checkpoints"):
                print(line)
            _warn_of_memory(config)
        return _train_in(run_dir, config)


def _warn_of_memory(config) -> None:
    """On a GPU, say when the plan of the run's memory exceeds it
    (``coom.plan.fit``); before any process joins the process group,
    as the planner joins a fake one."""
    import torch

    from coom.parallel.mesh import launched_world_size
    from coom.train.device import resolve_device
    if resolve_device(config.train.device).type != "cuda":
        return
    from coom.plan.fit import memory_warning
    from coom.plan.ranks import as_on_gpu
    memory = torch.cuda.get_device_properties(0).total_memory
    try:
        warning = memory_warning(as_on_gpu(config, memory),
                                 launched_world_size(), memory)
    except UserError:
        raise  # the config's own errors, which the run would meet too
    except Exception as error:  # advice must not stop a run that may fit
        warning = f"warning: coom plan could not plan this run ({error!r})"
    if warning is not None:
        print(warning)


def _train_in(run_dir: Path, config) -> int:
    """Train config in run_dir, through its growths, and say how it
    ended."""
    from coom.train.lifecycle import train_run
    outcome = train_run(config, run_dir)
    if not outcome.main:
        return 0
    if outcome.reason == "done":
        print(f"finished {outcome.step} steps; summary and plots: "
              f"coom report {run_dir}")
    else:
        print(f"stopped at step {outcome.step} ({outcome.reason}) with a "
              f"checkpoint; continue with: {relaunch()} --resume "
              f"{run_dir}")
    print(outcome.energy)
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
    from coom.train.lifecycle import evaluate_checkpoint
    record = evaluate_checkpoint(config, run_dir, path)
    if record is None:
        return 0
    train, loss = config.train, record["val_loss"]
    print(f"{path}: validation loss {loss:.4f} (perplexity "
          f"{math.exp(loss):.2f}) over {train.eval_iters} micro-batches of "
          f"{train.micro_batch_size} x {config.data.seq_length} tokens")
    for key, value in record.items():
        if key.startswith("val_loss/"):
            language = key.removeprefix("val_loss/")
            bpb = record.get(f"val_bpb/{language}")
            print(f"  {language:>5}: loss {value:.4f}"
                  + ("" if bpb is None else f", {bpb:.4f} bits per byte"))
    if args.out:
        Path(args.out).write_text(json.dumps(
            {"checkpoint": str(path), **record,
             "overrides": args.overrides}) + "\n")
        print(f"written to {args.out}")
    return 0
