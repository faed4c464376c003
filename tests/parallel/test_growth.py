"""Growth in flight under torchrun, on gloo: a run that grows deeper and
gains experts after step 2 gives the single process's losses under FSDP2,
expert parallelism and pipeline parallelism. The first process grows the
checkpoint; each layout then parallelises the grown model and loads the
grown checkpoint resharded."""
import json
import shutil

import pytest

from tests.launch import check, launch

STEPS = 5
ARGS = ["tiny", "--set", "train.device=cpu", "train.precision=fp32",
        f"train.steps={STEPS}", "train.micro_batch_size=1",
        "train.global_batch_size=4", "schedule.lr_warmup_iters=1",
        f"train.eval_interval={STEPS}", "train.eval_iters=1",
        "logging.log_interval=1", "logging.tensorboard=false",
        "logging.progress_bar=false", "data.synthetic=true",
        "model.vocab_size=512", "data.seq_length=64", "model.num_layers=2",
        "growth.schedule=[{step: 2, op: depth, args: {num_layers: 3}}, "
        "{step: 2, op: add_experts, args: {n_routed_experts: 10}}]"]


def _train(run_dir, processes: int, *overrides: str):
    return launch(processes, "train", "--run-dir", str(run_dir), *ARGS,
                  *overrides, before_retry=lambda: shutil.rmtree(run_dir))


def _losses(run_dir) -> list[float]:
    with open(run_dir / "metrics.jsonl") as file:
        records = [json.loads(line) for line in file]
    return [record["loss"] for record in records if "loss" in record]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    check(_train(run_dir, 1))
    return _losses(run_dir)


@pytest.mark.parametrize("overrides", [
    ["parallel.data_parallel_shard=2"],
    ["parallel.expert=2"],
    ["parallel.pipeline=2", "parallel.data_parallel_shard=1"],
], ids=["fsdp2", "ep2", "pp2"])
def test_growth_under_a_layout_matches_one_process(single, tmp_path,
                                                   overrides):
    check(_train(tmp_path, 2, *overrides))
    losses = _losses(tmp_path)
    assert len(losses) == len(single) == STEPS
    for ours, reference in zip(losses, single):
        assert abs(ours - reference) <= 1e-5 * abs(reference)
