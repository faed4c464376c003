"""The batch's split over a layout's data-parallel processes, checked
before any work."""
import pytest

from coom.config import load_config
from coom.errors import UserError
from coom.parallel.build import check_batch_split


def _config(global_batch: int, micro_batch: int, *overrides: str):
    return load_config("tiny", ["model.vocab_size=512",
                                f"train.global_batch_size={global_batch}",
                                f"train.micro_batch_size={micro_batch}",
                                *overrides])


def test_whole_micro_batches_for_every_process_pass():
    check_batch_split(_config(16, 2), 8)
    check_batch_split(_config(16, 4, "parallel.pipeline=2"), 2)


def test_a_batch_that_does_not_split_names_both_ways_out():
    """16 sequences over 8 processes at micro-batches of 16: a global
    batch of 128 would do, and so would micro-batches of 2."""
    with pytest.raises(UserError) as raised:
        check_batch_split(_config(16, 16), 8)
    assert str(raised.value) == (
        "config field train.global_batch_size: 16 does not split into 8 "
        "data-parallel processes x micro_batch_size 16; make it a "
        "multiple of 128, or set train.micro_batch_size=2")


def test_no_micro_batch_size_is_offered_where_none_splits():
    with pytest.raises(UserError) as raised:
        check_batch_split(_config(12, 4), 8)
    assert str(raised.value).endswith("make it a multiple of 32")


def test_too_few_micro_batches_for_the_pipeline_are_refused():
    """2 processes of a 2-stage 1F1B pipeline share no data: each runs
    16 / 16 = 1 micro-batch, and 1F1B needs one per stage."""
    with pytest.raises(UserError, match="1F1B over 2 stages needs at "
                                        "least 2, one per stage"):
        check_batch_split(_config(16, 16, "parallel.pipeline=2"), 1)
