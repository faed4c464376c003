"""The one-line error of a config value, and the checks that raise it."""
from coom.errors import UserError


class ConfigError(UserError):
    """A config value that is unknown, of the wrong type or impossible."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"config field {name}: {problem}")
        self.name = name
        self.problem = problem


def require(condition: bool, name: str, problem: str) -> None:
    """Raise ConfigError(name, problem) unless condition holds."""
    if not condition:
        raise ConfigError(name, problem)


def positive(section, *names: str) -> None:
    """Require each named field of section to be positive."""
    for name in names:
        value = getattr(section, name)
        require(value > 0, name, f"must be positive, got {value}")
