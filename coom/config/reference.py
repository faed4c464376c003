"""The Markdown reference of every section and field (docs/config.md),
generated from the dataclasses' field docstrings."""
import ast
import dataclasses
import inspect
import textwrap

import yaml

from coom.config.run import RunConfig


def _field_docstrings(cls) -> dict[str, str]:
    """The string literal under each field of dataclass cls."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and \
                isinstance(following, ast.Expr) and \
                isinstance(following.value, ast.Constant):
            text = " ".join(following.value.value.split())
            docs[node.target.id] = text
    return docs


def _section(name: str, cls) -> list[str]:
    """The lines of section name (a dataclass), then of each section
    nested in it."""
    lines = [f"## `{name}`", "", inspect.cleandoc(cls.__doc__), "",
             "| field | default | meaning |", "|---|---|---|"]
    docs = _field_docstrings(cls)
    defaults = cls()
    nested = []
    for item in dataclasses.fields(cls):
        value = getattr(defaults, item.name)
        if dataclasses.is_dataclass(value):
            nested.append((f"{name}.{item.name}", type(value)))
            default = f"section `{name}.{item.name}`"
        else:
            default = yaml.safe_dump(value, default_flow_style=True).strip()
            default = "`" + default.removesuffix("\n...").removesuffix(
                " ...") + "`"
        lines.append(f"| `{item.name}` | {default} | {docs[item.name]} |")
    lines.append("")
    for child, child_cls in nested:
        lines += _section(child, child_cls)
    return lines


def config_reference() -> str:
    """Markdown reference of every section and field, from the code."""
    lines = ["# Configuration reference", "",
             "Generated from `coom/config.py` by "
             "`python -m coom.config > docs/config.md`; a test keeps it in "
             "step with the code.", ""]
    for section in dataclasses.fields(RunConfig):
        lines += _section(section.name, section.type)
    return "\n".join(lines)
