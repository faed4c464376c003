"""``coom convert``: COOM checkpoints to Hugging Face folders and back.

``to_hf`` writes ``model.safetensors``, ``config.json`` and the run's
tokenizer (``tokenizer.json``, and a ``tokenizer_config.json`` naming its
end-of-document token), a folder that
``transformers.AutoModelForCausalLM`` loads as ``DeepseekV3ForCausalLM``
(``DeepseekV2ForCausalLM`` where experts are routed by softmax scores),
and ``AutoTokenizer`` as its tokenizer. ``from_hf`` writes a COOM
checkpoint folder (the weights as training checkpoints hold them, and the
tokenizer's two files) and ``recipe.yaml``, a recipe whose model section
is the imported model's and whose ``checkpoint.init_from`` names the
folder, so that ``coom train OUT/recipe.yaml`` continues training it.
"""
import dataclasses
import json
import shutil
from pathlib import Path

import yaml

from coom.checkpoint.storage import write_checkpoint_folder
from coom.data.tokenizer import TOKENIZER_CONFIG, Tokenizer
from coom.errors import UserError
from coom.interop.hf import (
    TRAINING_FIELDS,
    TRAINING_KEY,
    check_exportable,
    save_hf,
)
from coom.interop.weights import Weights, read_weights


def _empty_folder(out: Path, overwrite: bool, source: Path) -> None:
    """Make out an empty folder, replacing what is there with overwrite,
    but never source or a folder that holds it."""
    target = out.resolve()
    if target == source.resolve() or target in source.resolve().parents:
        raise UserError(f"{out} holds the source {source}, which writing "
                        "there would delete; name another folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise UserError(f"{out} already exists; pass --overwrite to "
                            "replace it")
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _copy_tokenizer(weights: Weights, out: Path) -> Path | None:
    """Copy weights' tokenizer.json into out with a tokenizer_config.json
    (the one beside it, if any) whose eos_token is the run's
    end-of-document token: so that ``transformers.AutoTokenizer`` knows
    it, and COOM reads the same from the copy. A tokenizer without one
    is copied with its own file as it is. Returns the copy (None without
    a tokenizer)."""
    if weights.tokenizer is None:
        return None
    copy = out / "tokenizer.json"
    shutil.copyfile(weights.tokenizer, copy)
    declared = weights.tokenizer.with_name(TOKENIZER_CONFIG)
    try:
        eod = Tokenizer(weights.tokenizer, weights.eod_token).eod_token
        settings = json.loads(declared.read_text(encoding="utf-8")) \
            if declared.is_file() else {}
    except (UserError, ValueError):  # no end of document, or bad JSON
        settings = None
    if not isinstance(settings, dict):
        if declared.is_file():
            shutil.copyfile(declared, out / TOKENIZER_CONFIG)
        return copy
    settings.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    settings["eos_token"] = eod
    (out / TOKENIZER_CONFIG).write_text(json.dumps(settings, indent=1)
                                        + "\n")
    return copy


def to_hf(source: Path, out: Path, overwrite: bool = False) -> Path:
    """Write the model in source as a Hugging Face folder out."""
    weights = read_weights(source)
    check_exportable(weights.state, weights.config)
    _empty_folder(out, overwrite, source)
    save_hf(weights.state, weights.config, out)
    _copy_tokenizer(weights, out)
    return out


def write_model_folder(weights: Weights, source: Path, out: Path,
                       overwrite: bool, comment: str) -> Path:
    """Write weights, read from source, as a COOM checkpoint folder out
    (with the tokenizer when there is one) and a recipe that trains from
    it; returns the recipe's path."""
    _empty_folder(out, overwrite, source)
    model = dataclasses.asdict(weights.config)
    data = {}
    tokenizer = _copy_tokenizer(weights, out)
    if tokenizer is not None:
        data["tokenizer"] = str(tokenizer.resolve())
    write_checkpoint_folder(out, {"model": weights.state},
                            {"config": {"model": model, "data": data},
                             "tokenizer_sha256": weights.tokenizer_sha256})
    recipe = {"model": model, "data": data,
              "checkpoint": {"init_from": str(out.resolve())}}
    path = out / "recipe.yaml"
    path.write_text(f"# {comment}\n"
                    + yaml.safe_dump(recipe, sort_keys=False))
    return path


def from_hf(source: Path, out: Path,
            overwrite: bool = False) -> tuple[Path, dict]:
    """Import the Hugging Face folder source as a COOM checkpoint folder
    out with a recipe that trains from it. Returns the recipe's path and
    the training-only model fields that the folder did not carry (a
    config.json that COOM did not write), which take COOM's defaults."""
    if not (source / "config.json").is_file():
        raise UserError(f"{source} is not a Hugging Face model folder (no "
                        "config.json)")
    weights = read_weights(source)
    carried = TRAINING_KEY in json.loads((source / "config.json").read_text())
    defaults = {} if carried else {
        name: getattr(weights.config, name) for name in TRAINING_FIELDS}
    recipe = write_model_folder(
        weights, source, out, overwrite,
        f"Continues training the model imported from {source}.")
    return recipe, defaults
