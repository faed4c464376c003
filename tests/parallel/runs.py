"""Several ``coom`` commands in one torchrun launch, one after another,
in one process group: the multi-process tests start processes once for
many layouts rather than once for each (process start-up is most of a
small run's time on the 2-core CI machine).

    torchrun --nproc-per-node N tests/parallel/runs.py PLAN.json

PLAN.json holds a list of {"arguments": [...], "exit_code": FILE}; each
command's exit code is written to its FILE (by the first process). A
command that fails leaves the others to run.
"""
import gc
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from coom.cli import main


def run_all(plan: list[dict]) -> None:
    dist.init_process_group("gloo")
    first = dist.get_rank() == 0
    for run in plan:
        code = main(run["arguments"])
        if first:
            path = Path(run["exit_code"])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{code}\n")
        # A run's process groups and models, freed before the next.
        gc.collect()
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run_all(json.loads(Path(sys.argv[1]).read_text()))
