"""``coom experts rebalance``: renumbering a run's experts by a planned
placement changes nothing the model computes, balances the measured load
per rank, and the run resumes from the renumbered checkpoint (in one
process and under expert parallelism) as if nothing happened."""
import json
import os
from dataclasses import replace

import pytest
import torch

from coom.checkpoint.storage import (
    latest_checkpoint,
    load_checkpoint,
    read_train_state,
)
from coom.config import ModelConfig
from coom.errors import UserError
from coom.models import Transformer
from coom.parallel.expert import PLACEMENT, ExpertParallel, place_experts
from coom.parallel.placement import identity_placement
from coom.tools.rebalance import (
    measured_loads,
    moe_prefix,
    plan_layers,
    renumber,
)
from coom.train.run_dir import hold_lock
from tests.growth.test_operators import CONFIGS, _outputs, _trained_like
from tests.launch import check, launch
from tests.parallel.test_layouts import STEPS, _train, logged_losses


def _renumbered(model: Transformer, orders: dict[int, list[int]]):
    state = {name: tensor.clone() for name, tensor
             in model.state_dict().items()}
    for index, order in orders.items():
        renumber(state, moe_prefix(model.config, index), order)
    other = _trained_like(model.config, seed=1)
    other.load_state_dict(state)
    return other


def test_renumbering_keeps_logits_and_renumbers_the_load():
    model = _trained_like(CONFIGS["v3"])
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 97, (2, 16), generator=generator)
    labels = torch.randint(0, 97, (2, 16), generator=generator)
    orders = {index: torch.randperm(4, generator=generator).tolist()
              for index in model.moe_layers()}
    assert sorted(orders) == [1, 2, 3]  # two main blocks and the MTP's
    other = _renumbered(model, orders)
    (logits, loss), (ours, our_loss) = (_outputs(model, tokens, labels),
                                        _outputs(other, tokens, labels))
    for expected, got in zip(logits, ours):
        assert (got - expected).norm() <= 1e-6 * expected.norm()
    assert abs(our_loss - loss) <= 1e-6 * loss
    # The load (counted in training forwards) is renumbered too.
    for each in (model, other):
        for moe in each.moe_layers().values():
            moe.tokens_per_expert.zero_()
        with torch.no_grad():
            each.train()(tokens, labels_bs=labels)
    for index, order in orders.items():
        before = model.moe_layers()[index].tokens_per_expert
        after = other.moe_layers()[index].tokens_per_expert
        assert before.sum() > 0
        assert torch.equal(after, before[order])


def test_plan_balances_a_skewed_load_and_refuses_what_it_cannot():
    config = CONFIGS["groups"]
    plain = replace(config, n_group=1, topk_group=1)
    load = torch.tensor([40.0, 30, 20, 10, 5, 3, 1, 1])
    (plan,) = plan_layers(plain, {1: load}, ranks=2)
    assert sorted(plan.order) == list(range(8))
    # Ranks hold experts 0-3 and 4-7: 100 and 10 against a mean of 55;
    # the best 4 + 4 split is 56 and 54.
    assert plan.before == pytest.approx(100 / 55)
    assert plan.after == pytest.approx(56 / 55)
    with pytest.raises(UserError, match="group-limited"):
        plan_layers(config, {1: load}, ranks=2)
    with pytest.raises(UserError, match="must divide"):
        plan_layers(plain, {1: load}, ranks=3)
    with pytest.raises(UserError, match="no expert load"):
        plan_layers(plain, {}, ranks=2)


def test_plan_with_copies_keeps_owned_experts_local():
    """With 2 copies over 2 ranks the experts are renumbered so that only
    the copies' slots fetch weights from the other rank; under
    group-limited routing the numbers stay and the copies still
    balance."""
    config = CONFIGS["groups"]
    plain = replace(config, n_group=1, topk_group=1)
    load = torch.tensor([70.0, 30, 20, 10, 5, 3, 1, 1])
    for model, fetched in ((plain, 2), (config, 5)):
        (plan,) = plan_layers(model, {1: load}, ranks=2, redundant=2)
        placement = plan.placement
        assert placement.slots == 10 and sorted(plan.order) == list(range(8))
        for rank in range(2):
            slots = placement.slot_expert[5 * rank:5 * rank + 5]
            assert len(set(slots)) == 5
        # The two hottest experts (old 0 and 1) have a copy on each rank.
        hot = [plan.order.index(0), plan.order.index(1)]
        assert placement.replicas()[hot].tolist() == [2, 2]
        assert plan.fetched() == fetched
        assert plan.after < plan.before
    assert plan.order == list(range(8))


def test_the_load_before_is_measured_on_the_placement_in_force():
    """A second rebalance compares with the copies' placement the first
    one saved, when it was planned for as many ranks; otherwise with
    expert i on rank i // (e / R)."""
    config = replace(CONFIGS["groups"], n_group=1, topk_group=1)
    load = torch.tensor([70.0, 30, 20, 10, 5, 3, 1, 1])
    (first,) = plan_layers(config, {1: load}, ranks=2, redundant=2)
    # The same load, in the numbers the first rebalance gave the experts.
    load = load[first.order]
    placed = {"ranks": 2, "layers": {1: list(first.placement.slot_expert)}}
    (again,) = plan_layers(config, {1: load}, 2, 2, placed)
    assert again.before == pytest.approx(first.after)
    assert again.before < identity_placement(8, 2).imbalance(load)
    for other in ({**placed, "ranks": 4}, {"ranks": 2, "layers": {}}, None):
        (plain,) = plan_layers(config, {1: load}, 2, 2, other)
        assert plain.before == identity_placement(8, 2).imbalance(load)


# Expert parallelism without copies: the placement alone, within
# ep2-copies.
@pytest.mark.parametrize("processes, layout, redundant", [
    (1, [], 0), (2, ["parallel.expert=2"], 2)], ids=["one", "ep2-copies"])
def test_run_resumes_from_the_rebalanced_checkpoint(single, tmp_path,
                                                    processes, layout,
                                                    redundant):
    """Stopped after step 3, rebalanced for 2 ranks (with 2 copies per
    layer or none), resumed: steps 4 and 5 give the uninterrupted run's
    losses, and the measured load of the resumed steps is renumbered."""
    check(_train(tmp_path, 1, "train.exit_interval=3"))
    dry = launch(1, "experts", "rebalance", str(tmp_path), "--ranks", "2",
                 "--dry-run")
    check(dry)
    assert "nothing written" in dry.stdout
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_0000003"
    result = launch(1, "experts", "rebalance", str(tmp_path), "--ranks",
                    "2", "--redundant", str(redundant))
    check(result)
    assert "layer 1:" in result.stdout
    assert "wrote the latest checkpoint renumbered, " in result.stdout
    latest = latest_checkpoint(tmp_path / "checkpoints")
    assert latest.name == "step_0000003-rebalanced"
    placement = read_train_state(latest)[PLACEMENT]
    if redundant:
        assert placement["ranks"] == 2
        assert all(len(slots) == 8 + redundant
                   for slots in placement["layers"].values())
    else:
        assert placement is None
    plans = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")
             if "rebalance" in line]
    assert len(plans) == 1
    orders = {}
    for key in plans[0]["rebalance"]["layers"]:
        before, after = plans[0]["rebalance"]["layers"][key]
        assert after <= before
    # The renumbering, read back from the router rows it moved.
    old = load_checkpoint(tmp_path / "checkpoints" / "step_0000003",
                          {"model"})["model"]
    new = load_checkpoint(latest, {"model"})["model"]
    for name, tensor in new.items():
        if name.endswith("router.weight"):
            rows = [int((old[name] == row).all(-1).nonzero()) for row in
                    tensor]
            orders[name.removesuffix("router.weight")] = rows
    assert any(order != sorted(order) for order in orders.values())
    resumed = launch(processes, "train", "--resume", str(tmp_path),
                     "--set", "train.exit_interval=null", *layout)
    check(resumed)
    assert ("expert placement of step_0000003-rebalanced: redundant "
            "copies" in resumed.stdout) == bool(redundant)
    final = tmp_path / "checkpoints" / f"step_{STEPS:07d}"
    assert read_train_state(final)[PLACEMENT] == placement
    losses, expected = logged_losses(tmp_path), logged_losses(single)
    assert len(losses) == STEPS
    for ours, reference in zip(losses[3:], expected[3:]):
        assert abs(ours - reference) <= 1e-5 * abs(reference)
    config = ModelConfig(**read_train_state(latest)["config"]["model"])
    loads = measured_loads(tmp_path, STEPS)
    assert len(loads) == len(orders)
    for index, load in loads.items():
        order = orders[moe_prefix(config, index)]
        assert torch.equal(load, _load_after(single, index, 3)[order])


def _load_after(run_dir, index: int, step: int) -> torch.Tensor:
    """Layer index's load summed over the logged steps after step."""
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return sum(torch.tensor(record[f"moe_load_layer{index}"],
                            dtype=torch.float64)
               for record in records if record["step"] > step
               and f"moe_load_layer{index}" in record)


def test_a_run_in_use_is_not_rebalanced(tmp_path):
    """While a run trains in the directory (holding its lock), rebalance
    refuses in one line and writes nothing."""
    check(_train(tmp_path, 1, "train.exit_interval=3"))
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    with hold_lock(tmp_path):
        result = launch(1, "experts", "rebalance", str(tmp_path),
                        "--ranks", "2")
    assert result.returncode == 2
    assert f"run directory {tmp_path} is in use" in result.stderr
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before


def test_a_placement_for_other_ranks_is_left_unused():
    """Without expert parallelism (or over another number of ranks) a
    saved placement does not apply, and says why; nothing changes."""
    model = _trained_like(CONFIGS["v3"])
    layers = model.moe_layers()
    placement = {"ranks": 2, "layers": {
        index: [0, 1, 2, 0, 2, 3] for index in layers}}
    problem = place_experts(layers, placement)
    assert problem == "planned for 2 expert-parallel ranks, this run has 1"
    assert not any(isinstance(moe.experts, ExpertParallel)
                   for moe in layers.values())
