"""The ``coom`` command: train, prepare data, report.

Heavy modules are imported inside each command, so ``coom --help`` is
instant and tokenizer worker processes start light.
"""
import sys
import warnings

from coom.cli.parser import build_parser
from coom.cli.torchrun import first_process
from coom.errors import Adjusted, Skipped, UserError


def _recipe_after_set(args) -> None:
    """Take the recipe back from --set, whose list swallows a recipe name
    written after it (coom train --set train.steps=4 tiny)."""
    overrides = getattr(args, "overrides", [])
    if (getattr(args, "recipe", "") is None and overrides
            and "=" not in overrides[-1]):
        args.recipe = overrides.pop()


def _show_adjusted(message, category, filename, lineno, file=None,
                   line=None):
    """COOM's own warnings (values adjusted, input skipped) print as one
    coom line on the first process only; other warnings keep Python's
    form."""
    if not issubclass(category, (Adjusted, Skipped)):
        return _python_showwarning(message, category, filename, lineno,
                                   file, line)
    if first_process():
        print(f"coom: warning: {message}", file=sys.stderr)


_python_showwarning = warnings.showwarning


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _recipe_after_set(args)
    warnings.showwarning = _show_adjusted
    try:
        return args.handler(args)
    except UserError as error:
        if args.debug:
            raise
        # Under torchrun each process meets it; one line says it.
        if first_process():
            print(f"coom: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("coom: interrupted", file=sys.stderr)
        return 130
