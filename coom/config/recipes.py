"""Recipes: where they are found, how their YAML is read, and how a
recipe changes the recipe its ``base`` key names."""
from pathlib import Path

import yaml

from coom.config.checks import ConfigError, require
from coom.errors import UserError

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"


def recipe_path(recipe: str) -> Path:
    """Resolve a recipe name (coom/recipes/NAME.yaml) or a YAML path."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UserError(f"recipe file {path} does not exist")
        return path
    path = RECIPE_DIR / f"{recipe}.yaml"
    if path.parent != RECIPE_DIR or not path.is_file():
        names = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
        raise UserError(f"unknown recipe '{recipe}'; known recipes: "
                        f"{', '.join(names)}, or give a path to a .yaml file")
    return path


def first_line(error: Exception) -> str:
    """The first line of error's message, or its type when it has none."""
    lines = str(error).splitlines()
    return lines[0] if lines else type(error).__name__


def read_yaml(path: Path):
    """The YAML document in path (a recipe, a run's config.yaml), or one
    line that says why it cannot be read."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text (byte {error.start}); "
                        "save it as UTF-8") from None
    except OSError as error:
        raise UserError(f"{path} cannot be read: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise UserError(f"{path} is not valid YAML: "
                        f"{first_line(error)}") from None


def _merged(base: dict, changes: dict) -> dict:
    """base with changes applied, sections merged key by key."""
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            value = _merged(out[key], value)
        out[key] = value
    return out


def read_recipe(recipe: str, seen: tuple = ()) -> dict:
    """A recipe's tree, on top of the recipe its ``base`` key names."""
    path = recipe_path(recipe)
    require(path not in seen, "base", f"recipe {path} includes itself")
    tree = read_yaml(path) or {}
    require(isinstance(tree, dict), "recipe", f"{path} is not a mapping")
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise ConfigError("base", f"must be a recipe name, got {base!r}")
    if base.endswith((".yaml", ".yml")):
        base = str(path.parent / base)
    return _merged(read_recipe(base, (*seen, path)), tree)
