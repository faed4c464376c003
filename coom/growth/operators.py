"""The growth operators by name, and ``grow``, which applies one to a
model's weights and optimizer state.

Each operator is a pair of functions of its keyword arguments: the grown
model config (which checks the arguments), and the carry, which fills the
grown model's tensors of one kind (``coom.growth.tensors``). Every
operator keeps the model's function but ``depth`` with ``method=stack``:
the same logits for the same tokens, to float32 rounding. The balance
losses of the MoE blocks are regularisers defined over the expert count,
and change with it.
"""
import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from coom.config import ModelConfig
from coom.errors import UserError
from coom.growth import depth, experts, width
from coom.growth.tensors import KINDS, Tensors
from coom.models import Transformer
from coom.models.info import decays

MOMENTS = {"first": "exp_avg", "second": "exp_avg_sq"}


@dataclass(frozen=True)
class Operator:
    grown: Callable[..., ModelConfig]
    """(config, **arguments): the grown model's config."""

    carry: Callable[..., None]
    """(tensors, before, after, **arguments): fill tensors.new."""


OPERATORS = {
    "depth": Operator(depth.grown_depth, depth.carry_depth),
    "mtp": Operator(depth.grown_mtp, depth.carry_mtp),
    "width": Operator(width.grown_width, width.carry_width),
    "add_experts": Operator(experts.grown_add_experts,
                            experts.carry_add_experts),
    "split_experts": Operator(experts.grown_split_experts,
                              experts.carry_split_experts),
    "upcycle": Operator(experts.grown_upcycle, experts.carry_upcycle),
}


def describe(name: str, arguments: dict) -> str:
    """One operator with its arguments, as ``coom grow --op`` takes it."""
    return " ".join([name, *(f"{key}={value}"
                             for key, value in arguments.items())])


def operator(name: str) -> Operator:
    if name not in OPERATORS:
        raise UserError(f"unknown growth operator {name!r}; known: "
                        f"{', '.join(OPERATORS)}")
    return OPERATORS[name]


def _check_arguments(name: str, arguments: dict) -> None:
    """Refuse unknown arguments and values of the wrong type, naming
    them."""
    parameters = inspect.signature(operator(name).grown).parameters
    for key, value in arguments.items():
        parameter = parameters.get(key)
        if parameter is None or parameter.kind != parameter.KEYWORD_ONLY:
            if name == "width" and key in width.WIDTHS:
                expected = int
            else:
                known = [p for p, v in parameters.items()
                         if v.kind == v.KEYWORD_ONLY]
                raise UserError(f"growth operator {name} takes "
                                f"{', '.join(known) or 'widths'}; got {key}")
        else:
            expected = str if parameter.annotation is str else int
        if type(value) is not expected:
            raise UserError(f"growth operator {name}: {key} must be "
                            f"{expected.__name__}, got {value!r}")


def grown_config(config: ModelConfig, name: str,
                 arguments: dict) -> ModelConfig:
    """The config of config's model after operator name; raises
    UserError on bad arguments."""
    _check_arguments(name, arguments)
    return operator(name).grown(config, **arguments)


def _fresh_model(config: ModelConfig, seed: int) -> Transformer:
    """The grown model, initialised from seed without touching the
    global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device("meta"):
            model = Transformer(config)
        model.to_empty(device="cpu")
        model.init_weights()
    return model


@dataclass
class Grown:
    """A grown model: its config, weights and (if given) optimizer
    state, laid out as ``get_state_dict`` gives them in full."""

    config: ModelConfig
    weights: dict
    optimizer: Optional[dict]


def _grown_optimizer(optimizer: dict, moments: dict, model: Transformer
                     ) -> dict:
    """The optimizer state dict of model: the carried moments, every
    parameter at the same step count as before, the param groups'
    settings as they were."""
    step = max(state["step"] for state in optimizer["state"].values())
    state = {name: {"step": step.clone(),
                    "exp_avg": moments["first"][name],
                    "exp_avg_sq": moments["second"][name]}
             for name, _ in model.named_parameters()}
    decay, rest = [], []
    for name, parameter in model.named_parameters():
        (decay if decays(parameter) else rest).append(name)
    groups = [{**settings, "params": names} for settings, names in
              zip(optimizer["param_groups"], (decay, rest))]
    return {"state": state, "param_groups": groups}


def grow(config: ModelConfig, weights: dict, optimizer: Optional[dict],
         op: str, arguments: dict, seed: int) -> Grown:
    """Apply operator op to a model (config and float32 weights, by
    parameter name) and its AdamW state (or None); the grown model's new
    weights come from seed."""
    after = grown_config(config, op, arguments)
    model = _fresh_model(after, seed)
    fresh = {key: value.detach()
             for key, value in model.state_dict().items()}
    carry = operator(op).carry
    carried = {}
    for kind in KINDS if optimizer is not None else KINDS[:1]:
        if kind == "value":
            old, new = weights, dict(fresh)
        else:
            key = MOMENTS[kind]
            old = {name: optimizer["state"][name][key]
                   if name in optimizer["state"]
                   else torch.zeros_like(tensor)
                   for name, tensor in weights.items()}
            new = {name: torch.zeros_like(tensor)
                   for name, tensor in fresh.items()}
        tensors = Tensors(kind, old, new)
        carry(tensors, config, after, **arguments)
        carried[kind] = tensors.new
    grown_optimizer = None
    if optimizer is not None:
        grown_optimizer = _grown_optimizer(optimizer, carried, model)
    return Grown(after, carried["value"], grown_optimizer)
