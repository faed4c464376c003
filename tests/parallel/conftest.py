"""The single-process run that the multi-process runs are compared with
(``test_layouts``, ``test_rebalance``; ``test_pipeline`` has its own, of
4 blocks), trained once for the session: each launch costs seconds of
process start-up on the 2-core CI machine."""
import pytest

from tests.launch import check
from tests.parallel.test_layouts import _train


@pytest.fixture(scope="session")
def single(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    check(_train(run_dir, 1))
    return run_dir
