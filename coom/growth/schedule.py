"""Growth in flight: ``growth.schedule`` applied to a run's checkpoints.

The recipe's model section is the model before any growth, and the
schedule says what it becomes after each step, so the model at any step
is a pure function of the recipe (``model_at``). A growth step goes
through a checkpoint:

1. the trainer finishes the step, saves its checkpoint ``step_N`` and
   stops (the loop's outcome is ``"growth"``);
2. the next trainer finds that checkpoint one growth behind the
   schedule; every process loads it whole on the CPU and applies the
   step's operators to the weights and the optimizer moments (the same
   on each: the new weights are drawn from one seed), and together they
   publish ``step_N-grown`` as the latest checkpoint
   (``coom.checkpoint.transform``: atomically, like every checkpoint;
   DCP writes each tensor once);
3. that trainer builds the grown model, parallelises it for the run's
   layout, and resumes from the grown checkpoint, which reshards.

A run stopped anywhere (even between steps 1 and 2) resumes the same
way, and continues as the uninterrupted run would: the step, the data
position, the random generators and the learning-rate schedule carry on
from the checkpoint; only the model is bigger. The new weights are drawn
from ``train.seed`` plus the step.
"""
from dataclasses import asdict, replace
from pathlib import Path

from coom.checkpoint.storage import latest_checkpoint, read_train_state
from coom.checkpoint.transform import Whole, transform_checkpoint
from coom.config import GrowthStep, ModelConfig, RunConfig
from coom.errors import UserError
from coom.growth.operators import grow, grown_config
from coom.models.info import state_shapes

GROWN = "-grown"
"""Suffix of the checkpoint that holds a step's grown model."""


def model_at(model: ModelConfig, schedule: list[GrowthStep],
             step: int) -> ModelConfig:
    """The model after step: model grown by every entry up to step."""
    for entry in schedule:
        if entry.step <= step:
            model = grown_config(model, entry.op, entry.args)
    return model


def due(schedule: list[GrowthStep], step: int) -> list[GrowthStep]:
    """The growths that follow step."""
    return [entry for entry in schedule if entry.step == step]


def check_schedule(config: RunConfig) -> None:
    """Refuse a schedule whose operators or grown models do not fit the
    run, before any work: every grown model must make a valid run."""
    model = config.model
    for index, entry in enumerate(config.growth.schedule):
        try:
            model = grown_config(model, entry.op, entry.args)
            replace(config, model=model)
        except UserError as error:
            raise UserError(f"config field growth.schedule[{index}] "
                            f"(step {entry.step}): {error}") from None


def grow_checkpoint(path: Path, entries: list[GrowthStep], seed: int,
                    keep: int) -> Path:
    """Apply entries to the checkpoint at path and publish the result
    beside it as the latest checkpoint; every process of the run calls
    it."""
    def grow_all(whole: Whole) -> None:
        config = whole.train_state["config"]
        model = ModelConfig(**config["model"])
        for offset, entry in enumerate(entries):
            grown = grow(model, whole.weights, whole.optimizer, entry.op,
                         entry.args, seed + offset)
            model = grown.config
            whole.weights, whole.optimizer = grown.weights, grown.optimizer
        whole.train_state["config"] = config | {"model": asdict(model)}
    return transform_checkpoint(path, grow_all, GROWN, keep)


def catch_up(config: RunConfig, checkpoints: Path
             ) -> tuple[RunConfig, list[GrowthStep]]:
    """config with the model of the run's latest checkpoint, and the
    growths applied to reach it now. When that checkpoint is one growth
    behind the schedule, it is grown first (every process calls this).
    """
    schedule = config.growth.schedule
    if not schedule:
        return config, []
    check_schedule(config)
    latest = latest_checkpoint(checkpoints)
    if latest is None:
        return config, []
    state = read_train_state(latest)
    step = state["step"]
    stored = state_shapes(ModelConfig(**state["config"]["model"]))
    expected = model_at(config.model, schedule, step)
    entries = []
    if stored != state_shapes(expected):
        entries = due(schedule, step)
        before = model_at(config.model, schedule, step - 1)
        if stored != state_shapes(before) or not entries:
            raise UserError(
                f"checkpoint {latest} holds a model that growth.schedule "
                f"does not give at step {step}; resume with the recipe "
                "(model section and growth schedule) the run was started "
                "with")
        grow_checkpoint(latest, entries, config.train.seed + step,
                        config.checkpoint.keep)
    return replace(config, model=expected), entries
