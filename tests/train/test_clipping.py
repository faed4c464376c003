"""Gradient clipping in a training step: the step a trainer takes equals
torch's clip_grads_with_norm_ (of the trainer's norm) followed by
torch's own single-tensor AdamW, bit for bit, whether the
optimizer scales the gradients in its own pass (bf16 precision, whose
optimizer writes the compute copies) or they are scaled in place first
(float32), and with clipping on, off, or too loose to bite."""
import pytest
import torch

from coom.config import load_config
from coom.train.optimizer import CopyWritingAdamW, mtp_loss_weight
from coom.train.trainer import Trainer
from tests.parallel.test_precision import MICRO_BATCHES, OVERRIDES


def _trainer(path, precision: str, clip: float) -> Trainer:
    overrides = [*OVERRIDES, f"train.precision={precision}",
                 f"optimizer.clip_grad={clip}"]
    return Trainer(load_config("tiny", overrides), path)


def _reference_step(trainer: Trainer, clip: float) -> None:
    """Step 1 of trainer as torch would take it: the same micro-batches'
    gradients, clipped by torch, then a single-tensor torch AdamW."""
    config = trainer.config
    trainer.parallel.forward_backward(
        trainer._batches(), MICRO_BATCHES * config.data.seq_length,
        mtp_loss_weight(1, config.train.steps, config.schedule))
    parameters = [parameter for group in trainer.optimizer.param_groups
                  for parameter in group["params"]]
    if clip:
        torch.nn.utils.clip_grads_with_norm_(
            parameters, clip, trainer.parallel.gradient_norm(),
            foreach=False)
    settings = [{key: value for key, value in group.items()
                 if key not in ("foreach", "fused")}
                for group in trainer.optimizer.param_groups]
    for group in settings:
        group["lr"] = config.optimizer.lr
    torch.optim.AdamW(settings, foreach=False).step()


@pytest.mark.parametrize("clip", [0.05, 0.0, 1e6],
                         ids=["clipped", "off", "loose"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_step_clips_as_torch_does(tmp_path, precision, clip):
    trainer = _trainer(tmp_path / "run", precision, clip)
    assert isinstance(trainer.optimizer, CopyWritingAdamW) \
        == (precision == "bf16")
    metrics = trainer.train_step()
    reference = _trainer(tmp_path / "reference", precision, clip)
    _reference_step(reference, clip)
    # The norm reported is the norm before clipping, and clip 0.05
    # bites: the tiny model's first gradients are far larger.
    assert metrics["grad_norm"] > 1.0
    ours = dict(trainer.model.named_parameters())
    for name, expected in reference.model.named_parameters():
        assert torch.equal(ours[name], expected), name
