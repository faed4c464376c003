"""The one exception type for mistakes a user can fix.

The CLI prints a ``UserError`` as a single line and exits with code 2;
anything else is a bug in COOM and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a config field, a data file, a checkpoint or a path.

    The message names the field or file and says how to fix it.
    """


class Adjusted(UserWarning):
    """A value COOM changed to one that works, such as a warmup longer
    than the run; the CLI prints it as one ``coom: warning:`` line."""


class Skipped(UserWarning):
    """Input COOM left out, such as a file it cannot read among many; the
    CLI prints it as one ``coom: warning:`` line."""
