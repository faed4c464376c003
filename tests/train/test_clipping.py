"""Gradient clipping in a training step: the step a trainer takes equals
torch's clip_grads_with_norm_ (of the trainer's norm of the float32
gradients) followed by torch's own single-tensor AdamW, bit for bit,
the optimizer scaling the gradients in its own pass, whether it writes
compute copies (bf16 precision) or not (float32), with clipping on,
off, or too loose to bite, and whether a step sums 4 micro-batches'
gradients in float32 or keeps one micro-batch's in bf16 on the compute
copies."""
import pytest
import torch

from coom.config import load_config
from coom.train.optimizer import mtp_loss_weight
from coom.train.trainer import Trainer
from tests.parallel.test_precision import MICRO_BATCHES, OVERRIDES


def _trainer(path, precision: str, clip: float,
             micro_batches: int) -> Trainer:
    overrides = [*OVERRIDES, f"train.precision={precision}",
                 f"optimizer.clip_grad={clip}",
                 f"train.global_batch_size={micro_batches}"]
    return Trainer(load_config("tiny", overrides), path)


def _reference_step(trainer: Trainer, clip: float,
                    micro_batches: int) -> None:
    """Step 1 of trainer as torch would take it: the same micro-batches'
    gradients, in float32 on the masters (where the copies kept them,
    their norm is the same read there), clipped by torch, then a
    single-tensor torch AdamW."""
    config = trainer.config
    trainer.parallel.forward_backward(
        trainer._batches(), micro_batches * config.data.seq_length,
        mtp_loss_weight(1, config.train.steps, config.schedule))
    norm = trainer.parallel.gradient_norm()
    weights = trainer.parallel.weights
    if weights is not None and weights.keep_gradients:
        # The same gradients as float32 on the masters: the same norm.
        for copy, master in weights.copies.items():
            master.grad, copy.grad = copy.grad.float(), None
        weights.keep_gradients = False
        assert torch.equal(trainer.parallel.gradient_norm(), norm)
    parameters = [parameter for group in trainer.optimizer.param_groups
                  for parameter in group["params"]]
    if clip:
        torch.nn.utils.clip_grads_with_norm_(parameters, clip, norm,
                                             foreach=False)
    settings = [{key: value for key, value in group.items()
                 if key not in ("foreach", "fused")}
                for group in trainer.optimizer.param_groups]
    for group in settings:
        group["lr"] = config.optimizer.lr
    torch.optim.AdamW(settings, foreach=False).step()


@pytest.mark.parametrize("micro_batches", [MICRO_BATCHES, 1])
@pytest.mark.parametrize("clip", [0.05, 0.0, 1e6],
                         ids=["clipped", "off", "loose"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_step_clips_as_torch_does(tmp_path, precision, clip,
                                    micro_batches):
    trainer = _trainer(tmp_path / "run", precision, clip, micro_batches)
    assert (trainer.optimizer.weights is not None) == (precision == "bf16")
    weights = trainer.parallel.weights
    assert (weights is not None and weights.keep_gradients) == (
        precision == "bf16" and micro_batches == 1)
    metrics = trainer.train_step()
    reference = _trainer(tmp_path / "reference", precision, clip,
                         micro_batches)
    _reference_step(reference, clip, micro_batches)
    # The norm reported is the norm before clipping, and clip 0.05
    # bites: the tiny model's first gradients are far larger.
    assert metrics["grad_norm"] > 1.0
    ours = dict(trainer.model.named_parameters())
    for name, expected in reference.model.named_parameters():
        assert torch.equal(ours[name], expected), name
    # The step leaves no gradient behind, wherever it was held.
    assert all(p.grad is None for p in trainer.model.parameters())
    if weights is not None:
        assert all(copy.grad is None for copy in weights.copies)
