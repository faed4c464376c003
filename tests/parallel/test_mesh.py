"""Mesh degrees: data_parallel_shard filled in, and split by expert."""
import pytest

from coom.config import ParallelConfig
from coom.errors import UserError
from coom.parallel.mesh import degrees


def test_expert_must_divide_the_filled_in_data_parallel_shard():
    with pytest.raises(UserError, match="expert 4 does not divide "
                       "data_parallel_shard 2"):
        degrees(ParallelConfig(expert=4), 2)
