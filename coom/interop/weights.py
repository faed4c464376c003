"""Model weights from wherever they live, and ``coom.load_model``.

Three kinds of folder hold a model:

- a run directory (``coom train``'s ``--run-dir``): its latest checkpoint;
- a checkpoint folder: ``checkpoints/step_NNNNNNN`` of a run, or the
  folder ``coom convert --from hf`` writes;
- a Hugging Face folder: ``config.json`` plus ``*.safetensors`` of a
  ``DeepseekV3ForCausalLM`` or ``DeepseekV2ForCausalLM``.
"""
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from coom.checkpoint.storage import (
    META,
    is_checkpoint,
    latest_checkpoint,
    load_checkpoint,
)
from coom.config import ModelConfig
from coom.errors import UserError
from coom.interop.hf import load_hf
from coom.models import Transformer


@dataclass
class Weights:
    """A model config, its state dict, and the tokenizer that goes with it
    when the folder names one."""

    config: ModelConfig
    state: dict
    tokenizer: Optional[Path]
    tokenizer_sha256: Optional[str] = None
    eod_token: str | None = None
    """The tokenizer's end-of-document token where the run named it
    (data.eod_token)."""


def _existing(*paths: Path) -> Optional[Path]:
    return next((path for path in paths if path.is_file()), None)


def _from_checkpoint(folder: Path) -> Weights:
    state = load_checkpoint(folder, keys={"model"})
    config = state["config"]
    named = config.get("data", {}).get("tokenizer")
    tokenizer = _existing(*([Path(named)] if named else []),
                          folder / "tokenizer.json",
                          folder.parent.parent / "tokenizer.json")
    return Weights(ModelConfig(**config["model"]), state["model"], tokenizer,
                   state.get("tokenizer_sha256"),
                   config.get("data", {}).get("eod_token"))


def _check_shapes(config: ModelConfig, state: dict, folder: Path) -> None:
    """Refuse weights that the model config.json describes cannot hold,
    naming the first tensor that differs."""
    with torch.device("meta"):
        expected = Transformer(config).state_dict()
    for name in sorted(expected.keys() | state.keys()):
        if name not in state:
            problem = "is missing from the weights"
        elif name not in expected:
            problem = "is in the weights but not in the model"
        elif state[name].shape != expected[name].shape:
            problem = (f"has shape {tuple(state[name].shape)} in the "
                       f"weights, {tuple(expected[name].shape)} in the "
                       "model")
        else:
            continue
        raise UserError(f"{folder}: config.json does not describe its "
                        f"weights: {name} {problem}")


def read_weights(path) -> Weights:
    """The model weights in a run, checkpoint or Hugging Face folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; give a run directory, a "
                        "checkpoint folder or a Hugging Face model folder")
    if (folder / "checkpoints").is_dir():
        latest = latest_checkpoint(folder / "checkpoints")
        if latest is None:
            raise UserError(f"run {folder} has no checkpoint yet")
        return _from_checkpoint(latest)
    if is_checkpoint(folder):
        return _from_checkpoint(folder)
    if (folder / "config.json").is_file():
        config, state = load_hf(folder)
        _check_shapes(config, state, folder)
        return Weights(config, state, _existing(folder / "tokenizer.json"))
    raise UserError(f"{folder} holds no model: expected a run directory "
                    f"(checkpoints/), a checkpoint ({META}) or a Hugging "
                    "Face folder (config.json)")


def build_model(weights: Weights, device="cpu",
                dtype: torch.dtype = torch.float32) -> Transformer:
    """The model of weights, in eval mode."""
    with torch.device("meta"):
        model = Transformer(weights.config)
    model.to_empty(device=device)
    model.rope.init_weights()
    model.load_state_dict(weights.state, strict=True)
    return model.to(dtype).eval()


def load_model(path, device="cpu",
               dtype: torch.dtype = torch.float32) -> Transformer:
    """The model in a run directory, a checkpoint folder or a Hugging Face
    folder, in eval mode; ``model(input_ids)`` returns logits.

    Args:
        path: the folder (see the module docstring).
        device: where to put the weights.
        dtype: their dtype; checkpoints keep float32 master weights.
    """
    return build_model(read_weights(path), device, dtype)


def differences(ours: ModelConfig, theirs: ModelConfig) -> list[str]:
    """'field: theirs (ours)' for every model field that differs."""
    return [f"{item.name}: {getattr(theirs, item.name)} "
            f"(here {getattr(ours, item.name)})"
            for item in dataclasses.fields(ModelConfig)
            if getattr(ours, item.name) != getattr(theirs, item.name)]
