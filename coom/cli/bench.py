"""``coom bench``: one measurement of a recipe's training steps, or
(with --energy-sweep) a sweep over its settings."""
from pathlib import Path

from coom.errors import UserError


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
    result = run_bench(config, args.steps, args.warmup, args.real_data,
                       args.profile)
    result["recipe"] = args.recipe or "tiny"
    print(describe(result))
    if args.out:
        write_result(result, Path(args.out))
        print(f"figures written to {args.out}")
    return 0
