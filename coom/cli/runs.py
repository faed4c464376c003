"""The commands on a finished run's directory: ``coom report`` and
``coom experts rebalance``."""
from pathlib import Path


def cmd_report(args) -> int:
    from coom.train.report import write_report
    summary = write_report(Path(args.run_dir))
    print(summary.read_text())
    print(f"report written to {summary.parent}")
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
