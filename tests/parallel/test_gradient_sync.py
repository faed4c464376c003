"""Gradient accumulation under FSDP reduces the gradients once a step,
after the last micro-batch, however many micro-batches the step has:
two processes (torchrun, gloo) count FSDP's reduce-scatters over two
steps of 4 micro-batches each, and of 1. (That the results are the
single process's is ``test_layouts``'s check.)"""
from tests.launch import check, launch
from tests.parallel.test_layouts import ARGS

SCRIPT = """
import os
import sys

import torch.distributed as dist

from coom.cli import main

calls = []
reduce_scatter = dist.reduce_scatter_single


def counted(*args, **kwargs):
    calls.append(1)
    return reduce_scatter(*args, **kwargs)


dist.reduce_scatter_single = counted
code = main(sys.argv[1:])
if os.environ["RANK"] == "0":
    print(f"reduce-scatters: {len(calls)}", flush=True)
sys.exit(code)
"""


def _reduce_scatters(tmp_path, name: str, micro_batches: int) -> int:
    script = tmp_path / "count.py"
    script.write_text(SCRIPT)
    result = launch(2, str(script), "train", "--run-dir",
                    str(tmp_path / name), *ARGS, "train.steps=2",
                    "parallel.data_parallel_shard=2",
                    f"train.global_batch_size={2 * micro_batches}")
    check(result)
    (line,) = [line for line in result.stdout.splitlines()
               if line.startswith("reduce-scatters: ")]
    return int(line.split()[-1])


def test_gradients_are_reduced_once_a_step(tmp_path):
    once = _reduce_scatters(tmp_path, "one", micro_batches=1)
    assert once > 0
    assert _reduce_scatters(tmp_path, "four", micro_batches=4) == once
