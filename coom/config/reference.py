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


def config_reference() -> str:
    """Markdown reference of every section and field, from the code."""
    lines = ["# Configuration reference", "",
             "Generated from `coom/config.py` by "
             "`python -m coom.config > docs/config.md`; a test keeps it in "
             "step with the code.", ""]
    for section in dataclasses.fields(RunConfig):
        cls = section.type
        lines += [f"## `{section.name}`", "", cls.__doc__.strip(), "",
                  "| field | default | meaning |", "|---|---|---|"]
        docs = _field_docstrings(cls)
        defaults = cls()
        for item in dataclasses.fields(cls):
            default = yaml.safe_dump(getattr(defaults, item.name),
                                     default_flow_style=True).strip()
            default = default.removesuffix("\n...").removesuffix(" ...")
            lines.append(f"| `{item.name}` | `{default}` | "
                         f"{docs[item.name]} |")
        lines.append("")
    return "\n".join(lines)
