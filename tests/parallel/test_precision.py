"""Mixed precision in one process (``coom.parallel.precision``), on the
CPU in bf16 (``train.precision=bf16``): the forwards compute with bf16
copies made once a step, the micro-batches' gradients are summed in
float32 into the float32 masters, and the optimizer steps the masters
as a float32 AdamW of those gradients would."""
import pytest
import torch

from coom.cli import main
from coom.config import load_config
from coom.data.loader import Batch
from coom.train.trainer import Trainer
from tests.launch import check, launch
from tests.parallel.test_layouts import ARGS, _logged_steps

MICRO_BATCHES = 4
OVERRIDES = ["train.device=cpu", "train.precision=bf16",
             "train.micro_batch_size=1",
             f"train.global_batch_size={MICRO_BATCHES}",
             "data.synthetic=true", "model.vocab_size=512",
             "data.seq_length=32", "model.num_layers=2",
             "schedule.lr_warmup_iters=1",
             # float32 moments, as float32 AdamW keeps them (bf16's
             # default stores them rounded).
             "optimizer.moments_dtype=float32"]


@pytest.fixture
def trainer(tmp_path) -> Trainer:
    return Trainer(load_config("tiny", OVERRIDES), tmp_path)


def _batches(trainer: Trainer) -> list[Batch]:
    return [trainer.data.samples.batch(index)
            for index in range(MICRO_BATCHES)]


def _forward_backward(trainer: Trainer, batches: list[Batch]) -> None:
    trainer.parallel.forward_backward(
        batches, MICRO_BATCHES * trainer.config.data.seq_length, 0.3)


def test_forwards_compute_with_bf16_copies_made_once_a_step(trainer):
    masters = dict(trainer.model.named_parameters())
    seen = []

    def record(module, args):
        seen.append((module.weight, module.weight.detach().clone()))

    trainer.model.layers["0"].attention.wo.register_forward_pre_hook(record)
    trainer.model.norm.register_forward_pre_hook(record)
    # The router scores in float32, from its bf16 copy.
    router = trainer.model.layers["1"].mlp.router
    router_dtypes = set()
    router.register_forward_hook(
        lambda module, args, out: router_dtypes.update(
            {(module.weight.dtype, out[0].dtype)}))
    for _ in range(2):
        _forward_backward(trainer, _batches(trainer))
        expected = [masters[name].detach().to(torch.bfloat16)
                    for name in ("layers.0.attention.wo.weight",
                                 "norm.weight")]
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        # Per micro-batch, the projection's then the final norm's weight.
        step, seen[:] = seen[:], []
        assert len(step) == 2 * MICRO_BATCHES
        for index, (weight, value) in enumerate(step):
            assert weight.dtype == torch.bfloat16
            assert weight is step[index % 2][0]
            assert torch.equal(value, expected[index % 2])
    assert router_dtypes == {(torch.bfloat16, torch.float32)}
    for parameter in trainer.model.parameters():
        assert parameter.dtype == torch.float32


def _gradients(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: parameter.grad.clone()
            for name, parameter in trainer.model.named_parameters()
            if parameter.grad is not None}


def test_gradients_are_summed_in_float32(trainer):
    batches = _batches(trainer)
    each = []
    for batch in batches:
        _forward_backward(trainer, [batch])
        each.append(_gradients(trainer))
        trainer.optimizer.zero_grad()
    _forward_backward(trainer, batches)
    summed = _gradients(trainer)
    assert summed.keys() == each[0].keys()
    for name, gradient in summed.items():
        assert gradient.dtype == torch.float32
        expected = each[0][name]
        for other in each[1:]:
            expected = expected + other[name]
        assert torch.equal(gradient, expected), name
    # Each micro-batch's own gradient is a bf16 one, upcast.
    some = each[0]["layers.0.attention.wo.weight"]
    assert torch.equal(some, some.to(torch.bfloat16).float())


def test_step_is_a_float32_adamw_of_the_accumulated_gradients(trainer):
    _forward_backward(trainer, _batches(trainer))
    optimizer = trainer.optimizer
    for group in optimizer.param_groups:
        group["lr"] = 1e-3
    before = [[parameter.detach().clone() for parameter in group["params"]]
              for group in optimizer.param_groups]
    gradients = [[parameter.grad.clone() for parameter in group["params"]]
                 for group in optimizer.param_groups]
    optimizer.step()
    copies = [[torch.nn.Parameter(tensor) for tensor in group]
              for group in before]
    for group, grads in zip(copies, gradients):
        for parameter, grad in zip(group, grads):
            parameter.grad = grad
    settings = [{key: value for key, value in group.items()
                 if key not in ("params", "foreach", "fused")}
                for group in optimizer.param_groups]
    reference = torch.optim.AdamW(
        [dict(group, params=params)
         for group, params in zip(settings, copies)], foreach=False)
    reference.step()
    for group, expected in zip(optimizer.param_groups, copies):
        for parameter, want in zip(group["params"], expected):
            assert parameter.dtype == torch.float32
            torch.testing.assert_close(parameter.detach(), want.detach(),
                                       rtol=1e-6, atol=0)
    for state in optimizer.state.values():
        assert state["exp_avg"].dtype == torch.float32


def test_a_master_written_outside_the_optimizer_is_copied_again(trainer):
    """The optimizer writes the copies in its step; a master changed
    otherwise (a checkpoint loaded, say) is cast again before the next
    forward."""
    _forward_backward(trainer, _batches(trainer))
    trainer.optimizer.step()
    trainer.optimizer.zero_grad()
    master = trainer.model.layers["0"].attention.wo.weight
    with torch.no_grad():
        master.mul_(2.0)
    seen = []
    trainer.model.layers["0"].attention.wo.register_forward_pre_hook(
        lambda module, args: seen.append(module.weight.detach().clone()))
    _forward_backward(trainer, _batches(trainer)[:1])
    assert torch.equal(seen[0], master.detach().to(torch.bfloat16))


@pytest.mark.parametrize("layout", [
    ["parallel.expert=2", "parallel.data_parallel_shard=2"],
    ["parallel.pipeline=2", "parallel.pipeline_schedule=ZBVZeroBubble"]],
    ids=["ep2-fsdp2", "zbv-pipeline"])
def test_layouts_in_bf16_follow_one_process(tmp_path, layout):
    """Two processes (gloo) in bf16 give one process's bf16 run.

    - Experts split over both, the rest sharded by FSDP: FSDP gathers
      bf16 weights and reduces float32 gradients, and the experts'
      tokens travel in bf16.
    - A zero-bubble pipeline, alone (no FSDP): each process swaps in its
      stages' bf16 copies, and the schedule's weight gradients, which
      bypass the copies' hooks, are summed into the masters after.

    One step, from the same weights, gives one process's bf16 loss and
    gradient norm to within float32 summation order (measured: 4e-7 at
    most). (Later steps start from weights that Adam moved by
    differently rounded gradients.)"""
    overrides = ["train.precision=bf16", "train.steps=1",
                 "model.num_layers=4"]
    single, split = tmp_path / "single", tmp_path / "split"
    assert main(["train", "--run-dir", str(single), *ARGS,
                 *overrides]) == 0
    check(launch(2, "train", "--run-dir", str(split), *ARGS, *overrides,
                 *layout))
    (ours,), (theirs,) = (_logged_steps(run) for run in (split, single))
    for key in ("loss", "grad_norm"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-5)
