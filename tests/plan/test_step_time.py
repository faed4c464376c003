"""The planner's step time: operator costs against the model's own FLOP
count, the roofline's arithmetic, and calibration's table."""
import dataclasses

import pytest
import torch

from coom.config import load_config
from coom.models.info import attention_flops_per_token, model_info
from coom.plan.calibrate import calibrate
from coom.plan.ceilings import Ceilings, ceilings_for, save
from coom.plan.costs import OpCost, OpCosts
from coom.plan.dry_run import DryRun, dry_run
from coom.plan.gpus import GPUS
from coom.plan.ranks import as_on_gpu
from coom.plan.step_time import MASTER_BYTES, step_time


def test_products_cost_the_flops_the_model_counts():
    """Every linear, expert product and the fused loss's products, as
    ``coom model info`` counts them (MTP off: its depth sees one token
    fewer per sequence, which model info does not count)."""
    config = as_on_gpu(load_config("tiny", [
        "train.micro_batch_size=2", "model.mtp_num_layers=0"]), 2 ** 36)
    ops = dry_run(config).ops
    tokens = 2 * config.data.seq_length
    info = model_info(config.model, config.data.seq_length)
    attention = attention_flops_per_token(
        config.model, config.data.seq_length, config.model.num_layers)
    products = sum(op.flops for op in ops if "matmul" in op.kind)
    assert products == (info.training_flops_per_token - attention) * tokens
    assert {op.kind for op in ops} == {"matmul", "grouped matmul",
                                       "attention", "memory"}


CEILINGS = Ceilings("test", {"matmul": 1e12, "grouped matmul": 1e12,
                             "attention": 1e12, "memory": 1e11},
                    launch=1e-6, source="test")
RUN = DryRun(0, 0, 0, [OpCost("matmul", 3 * 10 ** 9, 0),
                       OpCost("memory", 0, 10 ** 6),
                       OpCost("memory", 0, 10 ** 3)])
MICRO = 3e-3 + 1e-5 + 1e-6  # the last op takes a launch


def _time(overrides, world_size=1):
    config = load_config("tiny", ["model.vocab_size=512",
                                  "train.micro_batch_size=1",
                                  "train.global_batch_size=8", *overrides])
    return step_time(config, world_size, RUN, CEILINGS, GPUS["h100"],
                     local_elements=10 ** 6, unit_elements=0)


COPY = 2
"""The bf16 compute copy the optimizer writes outside FSDP."""
BF16_MOMENTS = 8
"""Both moments read and written in bf16, the default in bf16."""


def test_roofline_adds_each_operator_at_its_rate():
    time = _time([])
    assert time.parts["compute"] == pytest.approx(8 * MICRO)
    # A float32 gradient: 8 micro-batches sum theirs.
    assert time.parts["optimizer"] == pytest.approx(
        10 ** 6 * (MASTER_BYTES + 4 + BF16_MOMENTS + COPY) / 1e11)


def test_one_micro_batch_reads_its_bf16_gradients():
    """One process and one micro-batch a step: the optimizer reads the
    gradients the bf16 copies keep."""
    time = _time(["train.global_batch_size=1"])
    assert time.parts["optimizer"] == pytest.approx(
        10 ** 6 * (MASTER_BYTES + 2 + BF16_MOMENTS + COPY) / 1e11)


@pytest.mark.parametrize("world_size, overrides, moments", [
    (2, ["parallel.data_parallel_shard=2"], BF16_MOMENTS),
    (1, ["train.precision=fp32"], 16),
])
def test_no_copy_is_written_under_fsdp_or_in_float32(world_size,
                                                     overrides, moments):
    """FSDP's policy makes the compute weights as it gathers them, and
    float32 computes with the masters: the step writes no copy (and in
    float32 the moments are float32)."""
    time = _time(overrides, world_size)
    assert time.parts["optimizer"] == pytest.approx(
        10 ** 6 * (MASTER_BYTES + 4 + moments) / 1e11)


def test_float32_moments_move_twice_the_moments_bytes():
    time = _time(["optimizer.moments_dtype=float32"])
    assert time.parts["optimizer"] == pytest.approx(
        10 ** 6 * (MASTER_BYTES + 4 + 2 * BF16_MOMENTS + COPY) / 1e11)


def test_in_place_operators_move_bytes_and_views_none():
    """x.add_(y) reads x and y and writes x; a view moves nothing."""
    x, y = (torch.ones(256, device="meta") for _ in range(2))
    with OpCosts() as costs:
        x.add_(y)
        x.view(16, 16)
    assert costs.ops == [OpCost("memory", 0, 3 * x.nbytes)]


def test_pipeline_pays_its_bubble():
    time = _time(["parallel.pipeline=2", "model.num_layers=4"], 2)
    # Half the blocks each, 8 micro-batches, one more stage's worth.
    assert time.parts["compute"] == pytest.approx(8 * MICRO / 2)
    assert time.parts["pipeline bubble"] == pytest.approx(MICRO / 2)


def test_calibration_measures_and_plans_read_it(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    measured = calibrate("h100", torch.device("cpu"), scale=16)
    assert set(measured.rates) == {"matmul", "grouped matmul",
                                   "attention", "memory"}
    assert all(rate > 0 for rate in measured.rates.values())
    assert 0 < measured.launch < 1e-3
    save(measured)
    read = ceilings_for(GPUS["h100"])
    datasheet = ceilings_for(dataclasses.replace(GPUS["h100"],
                                                 name="uncalibrated"))
    assert read.rates == datasheet.rates | measured.rates
    assert read.source.startswith("measured on CPU")


def test_fp8_products_are_counted_as_fp8_work():
    """Under blockwise FP8 the linears and experts run COOM's FP8 ops;
    their FLOPs count as FP8 products, at least the model's (the expert
    weight gradients also multiply the tile padding they are given). The
    filter is off: tiny's products are all too narrow to gain."""
    overrides = ["train.micro_batch_size=2", "model.mtp_num_layers=0",
                 "fp8.filter=false"]
    counted = {}
    for recipe in ("off", "blockwise"):
        config = as_on_gpu(load_config(
            "tiny", overrides + [f"fp8.recipe={recipe}"]), 2 ** 36)
        ops = dry_run(config).ops
        counted[recipe] = {kind: sum(op.flops for op in ops
                                     if op.kind == kind)
                           for kind in {op.kind for op in ops}}
    fp8 = counted["blockwise"]
    assert fp8["fp8 matmul"] > 0 and fp8["fp8 grouped matmul"] > 0
    products = sum(flops for kind, flops in fp8.items() if "matmul" in kind)
    assert products >= sum(flops for kind, flops in counted["off"].items()
                           if "matmul" in kind)


def test_fsdp_traffic_counts_only_beyond_the_compute():
    """8 processes of FSDP, one micro-batch each: every unit gathered in
    bf16 for the forward and again for the backward, its gradients
    reduce-scattered in float32, over NVLink; under HSDP 2 x 4 the
    gradient shards are also all-reduced over the replicas, across
    nodes when the replicas are farther apart than a node."""
    units = 10 ** 10
    h100 = GPUS["h100"]
    config = load_config("tiny", ["model.vocab_size=512",
                                  "train.micro_batch_size=1",
                                  "train.global_batch_size=8"])
    time = step_time(config, 8, RUN, CEILINGS, h100, 10 ** 6, units)
    gathered = units * (2 * 2 + 4) * 7 / 8 / h100.link_bandwidth
    assert time.parts["FSDP, beyond the compute"] == pytest.approx(
        gathered - time.parts["compute"])
    hsdp = dataclasses.replace(config, parallel=dataclasses.replace(
        config.parallel, data_parallel_replicate=2))
    time = step_time(hsdp, 8, RUN, CEILINGS, h100, 10 ** 6, units)
    gathered = units * (2 * 2 + 4) * 3 / 4 / h100.link_bandwidth
    reduced = 2 * units / 4 * 4 * 1 / 2 / h100.link_bandwidth
    assert time.parts["FSDP, beyond the compute"] == pytest.approx(
        gathered + reduced - time.parts["compute"])
