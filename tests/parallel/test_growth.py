"""Growth in flight under torchrun, on gloo: a run that grows deeper and
gains experts after step 2 gives the single process's losses under FSDP2,
expert parallelism and pipeline parallelism. The first process grows the
checkpoint; each layout then parallelises the grown model and loads the
grown checkpoint resharded."""
import shutil

import pytest

from tests.launch import check, launch
from tests.parallel.test_layouts import ARGS, STEPS, logged_losses

GROWTH = ("growth.schedule=[{step: 2, op: depth, args: {num_layers: 3}}, "
          "{step: 2, op: add_experts, args: {n_routed_experts: 10}}]")


def _train(run_dir, processes: int, *overrides: str):
    return launch(processes, "train", "--run-dir", str(run_dir), *ARGS,
                  GROWTH, *overrides,
                  before_retry=lambda: shutil.rmtree(run_dir))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    check(_train(run_dir, 1))
    return logged_losses(run_dir)


@pytest.mark.parametrize("overrides", [
    ["parallel.data_parallel_shard=2"],
    ["parallel.expert=2"],
    ["parallel.pipeline=2", "parallel.data_parallel_shard=1"],
], ids=["fsdp2", "ep2", "pp2"])
def test_growth_under_a_layout_matches_one_process(single, tmp_path,
                                                   overrides):
    check(_train(tmp_path, 2, *overrides))
    losses = logged_losses(tmp_path)
    assert len(losses) == len(single) == STEPS
    for ours, reference in zip(losses, single):
        assert abs(ours - reference) <= 1e-5 * abs(reference)
