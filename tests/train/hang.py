"""``coom`` with the second process made to hang in its third step,
once (a marker file in the run directory says it did), for the watchdog
test: python hang.py ARGUMENTS runs ``coom ARGUMENTS``."""
import sys
import time

from coom.cli import main
from coom.train.trainer import Trainer

MARKER = "hung-once"
train_step = Trainer.train_step


def hanging_step(trainer):
    marker = trainer.run_dir / MARKER
    if trainer.world.rank == 1 and trainer.step == 2 \
            and not marker.exists():
        marker.touch()
        time.sleep(3600)
    return train_step(trainer)


if __name__ == "__main__":
    Trainer.train_step = hanging_step
    sys.exit(main(sys.argv[1:]))
