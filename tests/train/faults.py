"""``coom`` with a fault in its second process, for the resilience tests:
``python faults.py FAULT ARGUMENTS`` runs ``coom ARGUMENTS`` with FAULT

- 'hang': the process sleeps in its third step, once (a marker file in
  the run directory says it did);
- 'nan': its loss and gradients turn NaN in the step whose batch starts
  at sample 12 (the fourth of four samples a step).
"""
import sys
import time

import torch

from coom.cli import main
from coom.parallel.model import ParallelModel
from coom.train.trainer import Trainer

MARKER = "hung-once"
NAN_AT = 12
train_step, forward_backward = Trainer.train_step, \
    ParallelModel.forward_backward


def hanging_step(trainer):
    marker = trainer.run_dir / MARKER
    if trainer.world.rank == 1 and trainer.step == 2 \
            and not marker.exists():
        marker.touch()
        time.sleep(3600)
    return train_step(trainer)


def noting_step(trainer):
    poisoned["now"] = trainer.world.rank == 1 \
        and trainer.consumed_samples == NAN_AT
    return train_step(trainer)


def poisoned_backward(model, *args, **kwargs):
    sums = forward_backward(model, *args, **kwargs)
    if not poisoned["now"]:
        return sums
    with torch.no_grad():
        for parameter in model.model.parameters():
            if parameter.grad is not None:
                parameter.grad.fill_(float("nan"))
    return sums * float("nan")


poisoned = {"now": False}

if __name__ == "__main__":
    fault = sys.argv.pop(1)
    if fault == "hang":
        Trainer.train_step = hanging_step
    else:
        Trainer.train_step = noting_step
        ParallelModel.forward_backward = poisoned_backward
    sys.exit(main(sys.argv[1:]))
