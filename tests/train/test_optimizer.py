import contextlib
import math

import pytest
import torch

from coom.config import ModelConfig, OptimizerConfig, ScheduleConfig
from coom.models import Transformer
from coom.parallel.precision import ComputeWeights
from coom.train.optimizer import (
    build_optimizer,
    learning_rate,
    mtp_loss_weight,
)

OPT = OptimizerConfig(lr=1.0, min_lr=0.1)


def _lr(step, style, steps=100, warmup=10, **extra):
    schedule = ScheduleConfig(lr_decay_style=style, lr_warmup_iters=warmup,
                              **extra)
    return learning_rate(step, steps, OPT, schedule)


@pytest.mark.parametrize("style", ["cosine", "wsd", "linear", "constant"])
def test_warmup_is_linear_from_zero(style):
    assert _lr(1, style) == pytest.approx(0.1)
    assert _lr(5, style) == pytest.approx(0.5)
    assert _lr(10, style) == pytest.approx(1.0)


def test_cosine_reaches_min_lr_halfway_at_the_mean():
    assert _lr(55, "cosine") == pytest.approx(0.55)
    assert _lr(100, "cosine") == pytest.approx(0.1)
    values = [_lr(s, "cosine") for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_linear_decay():
    assert _lr(55, "linear") == pytest.approx(0.55)
    assert _lr(100, "linear") == pytest.approx(0.1)


def test_wsd_is_stable_then_decays_over_the_last_fifth():
    assert _lr(80, "wsd") == pytest.approx(1.0)
    assert _lr(90, "wsd") == pytest.approx(0.55)
    assert _lr(100, "wsd") == pytest.approx(0.1)


def test_wsd_with_explicit_cosine_decay():
    kwargs = {"lr_wsd_decay_iters": 40, "lr_wsd_decay_style": "cosine"}
    assert _lr(60, "wsd", **kwargs) == pytest.approx(1.0)
    middle = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert _lr(80, "wsd", **kwargs) == pytest.approx(middle)


def test_constant_after_warmup():
    assert _lr(100, "constant") == pytest.approx(1.0)


def test_norm_scales_are_not_decayed():
    config = ModelConfig(vocab_size=11, hidden_size=8, num_layers=1,
                         num_attention_heads=2, ffn_hidden_size=8)
    model = Transformer(config)
    optimizer = build_optimizer(model, OptimizerConfig(weight_decay=0.1))
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"])
    assert all(p.dim() == 1 for p in plain["params"])
    assert sum(p.numel() for g in (decayed, plain) for p in g["params"]) \
        == sum(p.numel() for p in model.parameters())
    assert isinstance(optimizer, torch.optim.AdamW)


def _stepped(moments: str, compute: torch.dtype = torch.bfloat16
             ) -> torch.optim.AdamW:
    """A linear layer's optimizer, moments as moments says, after one
    step in dtype compute: in bf16, of compute copies that keep their
    gradients."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    weights = None if compute == torch.float32 \
        else ComputeWeights(model, compute, keep_gradients=True)
    optimizer = build_optimizer(
        model, OptimizerConfig(moments_dtype=moments), weights, compute)
    with contextlib.nullcontext() if weights is None \
            else weights.swapped_in():
        model(torch.randn(2, 8, dtype=compute)).square().sum().backward()
    optimizer.step()
    return optimizer


@pytest.mark.parametrize("moments, compute, kept", [
    ("auto", torch.bfloat16, torch.bfloat16),
    ("auto", torch.float32, torch.float32),
    ("float32", torch.bfloat16, torch.float32),
    ("bf16", torch.float32, torch.bfloat16)])
def test_moments_are_bf16_by_default_where_the_model_computes_in_bf16(
        moments, compute, kept):
    """DeepSeek-V3's bf16 moments by default in bf16 (GPUs); float32
    ones where the model computes in float32 (the CPU's default), or
    where the config says."""
    state = _stepped(moments, compute).state.values()
    assert {s[name].dtype for s in state
            for name in ("exp_avg", "exp_avg_sq")} == {kept}


def test_bf16_moments_stay_bf16_through_a_checkpoint():
    """torch's load_state_dict casts state to the parameters' dtype; the
    moments come back in bf16, as saved."""
    optimizer = _stepped("bf16")
    saved = optimizer.state_dict()
    loaded = _stepped("bf16")
    loaded.load_state_dict(saved)
    for name in ("exp_avg", "exp_avg_sq"):
        for index, state in saved["state"].items():
            assert state[name].dtype == torch.bfloat16
            again = loaded.state_dict()["state"][index][name]
            assert again.dtype == torch.bfloat16
            assert torch.equal(again, state[name])
    wide = _stepped("float32").state_dict()["state"]
    assert all(state["exp_avg"].dtype == torch.float32
               for state in wide.values())


def test_tensors_of_other_step_counts_step_apart():
    """A parameter without a gradient in the first step is a step behind
    from then on: each launch takes the tensors of one step count, and
    the result is torch's single-tensor AdamW, bit for bit."""
    torch.manual_seed(1)
    model = torch.nn.Linear(8, 4)
    reference = [p.detach().clone().requires_grad_() for p in
                 model.parameters()]
    weights = ComputeWeights(model, torch.bfloat16, keep_gradients=True)
    optimizer = build_optimizer(model, OptimizerConfig(weight_decay=0.0),
                                weights)
    torch_adamw = torch.optim.AdamW(reference, lr=optimizer.defaults["lr"],
                                    betas=optimizer.defaults["betas"],
                                    eps=optimizer.defaults["eps"],
                                    weight_decay=0.0, foreach=False)
    for step in range(3):
        with weights.swapped_in():
            model(torch.randn(2, 8, dtype=torch.bfloat16)).square().sum() \
                .backward()
        if step == 0:
            weights.masters[model.bias].grad = None
        for mine, theirs in zip(model.parameters(), reference):
            grad = weights.gradient(mine)
            theirs.grad = None if grad is None else grad.float()
        optimizer.step()
        torch_adamw.step()
        optimizer.zero_grad()
    steps = [int(optimizer.state[p]["step"]) for p in model.parameters()]
    assert steps == [3, 2]
    for mine, theirs in zip(model.parameters(), reference):
        assert torch.equal(mine, theirs)


def test_without_compute_weights_the_step_is_torchs():
    """float32 precision (no copies to write): bf16 moments hold the
    float32 moments' step rounded; float32 ones are torch's, bit for
    bit."""
    torch.manual_seed(2)
    start = torch.nn.Linear(8, 4)
    steps = {}
    for moments in ("float32", "bf16", "torch"):
        model = torch.nn.Linear(8, 4)
        model.load_state_dict(start.state_dict())
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=OptimizerConfig().lr, betas=(0.9, 0.95),
            weight_decay=0.0, foreach=False) if moments == "torch" else \
            build_optimizer(model, OptimizerConfig(
                weight_decay=0.0, moments_dtype=moments))
        model(torch.ones(2, 8)).square().sum().backward()
        optimizer.step()
        steps[moments] = (model, optimizer)
    ours, theirs = steps["float32"], steps["torch"]
    for mine, expected in zip(ours[0].parameters(), theirs[0].parameters()):
        assert torch.equal(mine, expected)
        assert torch.equal(ours[1].state[mine]["exp_avg"],
                           theirs[1].state[expected]["exp_avg"])
    narrow = steps["bf16"][1]
    for mine, wide in zip(steps["bf16"][0].parameters(),
                          ours[0].parameters()):
        assert narrow.state[mine]["exp_avg"].dtype == torch.bfloat16
        assert torch.equal(narrow.state[mine]["exp_avg"],
                           ours[1].state[wide]["exp_avg"].bfloat16())


def test_mtp_weight_drops_after_the_switch():
    schedule = ScheduleConfig()
    assert mtp_loss_weight(1, 100, schedule) == 0.3
    assert mtp_loss_weight(70, 100, schedule) == 0.3
    assert mtp_loss_weight(71, 100, schedule) == 0.1
