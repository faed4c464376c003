"""Typed run configuration: dataclasses, YAML recipes, ``--set`` overrides.

A run is described by one ``RunConfig`` made of sections (model, data,
optimizer, schedule, train, checkpoint, logging). Each module receives only
its own section. Field names follow Megatron-Core's ``TransformerConfig`` and
``OptimizerConfig`` where such a name exists; a docstring under each field
says what it is and gives the Hugging Face ``DeepseekV3Config`` name where
that differs.

A recipe is a YAML file with the same nesting. Loading checks every value
against the field's type, rejects unknown keys, and runs each section's
``__post_init__`` checks, so a bad config fails before any work starts, in
one line that names the field.
"""
from coom.config.checks import ConfigError
from coom.config.data import DataConfig
from coom.config.energy import EnergyConfig
from coom.config.fp8 import FP8Config
from coom.config.growth import GROWTH_OPERATORS, GrowthConfig, GrowthStep
from coom.config.load import config_from_tree, load_config
from coom.config.model import ModelConfig
from coom.config.output import CheckpointConfig, LoggingConfig
from coom.config.parallel import ZERO_BUBBLE, ParallelConfig
from coom.config.recipes import RECIPE_DIR, read_yaml, recipe_path
from coom.config.reference import config_reference
from coom.config.run import RunConfig
from coom.config.training import OptimizerConfig, ScheduleConfig, TrainConfig

__all__ = [
    "GROWTH_OPERATORS", "RECIPE_DIR", "ZERO_BUBBLE", "CheckpointConfig",
    "ConfigError", "DataConfig", "EnergyConfig", "FP8Config", "GrowthConfig",
    "GrowthStep", "LoggingConfig", "ModelConfig", "OptimizerConfig",
    "ParallelConfig", "RunConfig", "ScheduleConfig", "TrainConfig",
    "config_from_tree", "config_reference", "load_config", "read_yaml",
    "recipe_path",
]
