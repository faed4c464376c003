"""A run's config from a recipe's tree and ``--set`` overrides: every
value checked against its field's type, every section validated."""
import dataclasses
import types
import typing
from typing import Literal, Optional

import yaml

from coom.config.checks import ConfigError, require
from coom.config.recipes import first_line, read_recipe
from coom.config.run import RunConfig


def _check_type(value, annotation, name: str):
    """Return value as the annotated type, or raise ConfigError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check_type(value, inner, name)
    if origin is Literal:
        word = {False: "off", True: "on"}.get(value) \
            if isinstance(value, bool) else None
        if word in args:
            value = word  # YAML reads a bare off or on as a boolean
        require(value in args, name,
                f"must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is list:
        require(isinstance(value, list), name,
                f"must be a list, got {value!r}")
        return [_check_type(v, args[0], f"{name}[{index}]")
                for index, v in enumerate(value)]
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, f"{name}.")
    if annotation is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if annotation is float and isinstance(value, int) \
            and not isinstance(value, bool):
        return float(value)
    exact = annotation is not int or not isinstance(value, bool)
    require(isinstance(value, annotation) and exact, name,
            f"must be {annotation.__name__}, got {value!r}")
    return value


def _build(cls, values: dict, prefix: str):
    """Instantiate dataclass cls from a nested dict, checking every key."""
    require(isinstance(values, dict), prefix.rstrip(".") or "recipe",
            f"must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        require(key in known, name,
                f"unknown key; known keys here: {', '.join(sorted(known))}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{name}.")
        else:
            kwargs[key] = _check_type(value, hint, name)
    try:
        return cls(**kwargs)
    except ConfigError as error:
        if error.name.startswith(prefix):
            raise
        raise ConfigError(prefix + error.name, error.problem) from None


def _apply_override(tree: dict, assignment: str) -> None:
    """Apply one 'section.field=value' assignment to a nested dict."""
    key, sep, text = assignment.partition("=")
    require(bool(sep) and bool(key), assignment,
            "an override must look like section.field=value")
    *sections, leaf = key.strip().split(".")
    node = tree
    for section in sections:
        node = node.setdefault(section, {})
        require(isinstance(node, dict), key, "is not a section")
    try:
        node[leaf] = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(key.strip(), f"--set value {text!r} is not valid "
                          f"YAML ({first_line(error)})") from None


def load_config(recipe: Optional[str] = None,
                overrides: Optional[list[str]] = None) -> RunConfig:
    """Load a recipe (and the recipe its ``base`` key names, which it
    changes), apply ``--set`` overrides, and validate the result."""
    tree = read_recipe(recipe) if recipe is not None else {}
    return config_from_tree(tree, overrides)


def config_from_tree(tree: dict, overrides: list[str] | None = None
                     ) -> RunConfig:
    """The config of a recipe's tree (changed in place) with ``--set``
    overrides applied, validated."""
    for assignment in overrides or []:
        _apply_override(tree, assignment)
    return _build(RunConfig, tree, "")
