"""FSDP's communication per step, counted under torchrun on gloo (two
processes) over two steps:

- gradient accumulation reduces the gradients once a step, after the
  last micro-batch, however many micro-batches the step has;
- in bf16 precision (``train.precision=bf16``, which the CPU accepts for
  this) parameters are all-gathered at 2 bytes each and gradients
  reduce-scattered in float32; in float32, both at 4;
- with ``parallel.fsdp_reshard=step`` each FSDP unit gathers once a
  step; otherwise each unit but the root gathers again for its backward,
  in every micro-batch.

(That the results are the single process's is ``test_layouts``'s
check.)
"""
import json

from tests.launch import check, launch
from tests.parallel.test_layouts import ARGS

SCRIPT = """
import json
import os
import sys

import torch.distributed as dist

from coom.cli import main
from coom.train.trainer import Trainer

gathers, reductions, steps = [], [], []


def counted(calls, collective):
    def call(*args, **kwargs):
        tensor = kwargs.get("output", args[0] if args else None)
        calls.append(tensor.element_size())
        return collective(*args, **kwargs)
    return call


dist.all_gather_single = counted(gathers, dist.all_gather_single)
dist.reduce_scatter_single = counted(reductions,
                                     dist.reduce_scatter_single)
train_step = Trainer.train_step


def step(self):
    before = len(gathers), len(reductions)
    metrics = train_step(self)
    steps.append([len(gathers) - before[0], len(reductions) - before[1]])
    return metrics


Trainer.train_step = step
code = main(sys.argv[1:])
if os.environ["RANK"] == "0":
    print("counted: " + json.dumps({
        "gather_bytes": sorted(set(gathers)),
        "reduce_bytes": sorted(set(reductions)), "steps": steps}),
        flush=True)
sys.exit(code)
"""


def _counts(tmp_path, name: str, micro_batches: int, *overrides) -> dict:
    script = tmp_path / "count.py"
    script.write_text(SCRIPT)
    result = launch(2, str(script), "train", "--run-dir",
                    str(tmp_path / name), *ARGS, "train.steps=2",
                    "parallel.data_parallel_shard=2",
                    f"train.global_batch_size={2 * micro_batches}",
                    *overrides)
    check(result)
    (line,) = [line for line in result.stdout.splitlines()
               if line.startswith("counted: ")]
    return json.loads(line.removeprefix("counted: "))


def test_fsdp_communicates_once_a_step_in_the_compute_precision(tmp_path):
    single = _counts(tmp_path, "one", 1)
    assert single["gather_bytes"] == single["reduce_bytes"] == [4]
    # The second step: the first follows the evaluation at step 0, whose
    # forward left the root gathered.
    _, (gathers, reductions) = single["steps"]
    assert reductions > 0
    accumulated = _counts(tmp_path, "four", 4, "train.precision=bf16",
                          "parallel.fsdp_reshard=micro_batch")
    assert accumulated["gather_bytes"] == [2]
    assert accumulated["reduce_bytes"] == [4]
    assert accumulated["steps"][1] == [4 * gathers, reductions]
    kept = _counts(tmp_path, "kept", 4, "train.precision=bf16",
                   "parallel.fsdp_reshard=step")
    # The root gathers once a micro-batch in any case; each other unit
    # once for its forward and once for its backward unless kept.
    units = (gathers + 1) // 2
    assert kept["steps"][1] == [units, reductions]
