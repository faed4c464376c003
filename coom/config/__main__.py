"""``python -m coom.config`` prints docs/config.md."""
from coom.config import config_reference

print(config_reference(), end="")
