"""``coom grow``: grow a model folder offline.

It reads any folder ``coom`` reads models from (a run directory, a
checkpoint, a Hugging Face folder), applies the operators in order and
writes a checkpoint folder with a recipe whose ``checkpoint.init_from``
names it, as ``coom convert --from hf`` does. Only the weights travel: a
run started from the folder starts its optimizer afresh. To carry the
optimizer moments, the data position and the step across, grow in flight
with ``growth.schedule``.
"""
from dataclasses import replace
from pathlib import Path

import yaml

from coom.errors import UserError
from coom.growth.operators import describe, grow
from coom.interop.convert import write_model_folder
from coom.interop.weights import read_weights


def parse_op(words: list[str]) -> tuple[str, dict]:
    """``["depth", "num_layers=8"]`` as (name, arguments); values are
    read as YAML (8 is a number)."""
    name, *assignments = words
    arguments = {}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key:
            raise UserError(f"--op {name}: arguments look like key=value; "
                            f"got {assignment!r}")
        arguments[key] = yaml.safe_load(text)
    return name, arguments


def grow_folder(source: Path, out: Path, ops: list[tuple[str, dict]],
                seed: int = 0, overwrite: bool = False) -> Path:
    """Grow the model in source by ops into the checkpoint folder out;
    returns the path of the recipe that trains from it."""
    weights = read_weights(source)
    config = weights.config
    state = {name: tensor.float() for name, tensor in weights.state.items()}
    for offset, (name, arguments) in enumerate(ops):
        grown = grow(config, state, None, name, arguments, seed + offset)
        config, state = grown.config, grown.weights
    steps = "; ".join(describe(name, arguments) for name, arguments in ops)
    return write_model_folder(
        replace(weights, config=config, state=state), source, out,
        overwrite,
        f"The model of {source} grown by: {steps}.")
