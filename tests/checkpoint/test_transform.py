"""A checkpoint loaded whole, transformed and published beside itself as
the latest; a transform that fails publishes nothing."""
import pytest
import torch

from coom.checkpoint.storage import (
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from coom.checkpoint.transform import Whole, transform_checkpoint


def _saved(folder):
    weight = torch.arange(12.0).view(3, 4)
    optimizer = {"state": {"w": {"step": torch.tensor(7.0),
                                 "exp_avg": weight / 10}},
                 "param_groups": [{"lr": 0.1, "params": ["w"]}]}
    return save_checkpoint(folder, 7, {"model": {"w": weight},
                                       "optimizer": optimizer},
                           {"step": 7, "note": "before"}, keep=2)


def _doubled(whole: Whole) -> None:
    whole.weights = {"w": 2 * whole.weights["w"]}
    moments = whole.optimizer["state"]["w"]
    moments["exp_avg"] = 2 * moments["exp_avg"]
    whole.train_state["note"] = "after"


def test_the_transformed_checkpoint_is_the_latest_and_the_old_intact(
        tmp_path):
    before = _saved(tmp_path)
    published = transform_checkpoint(before, _doubled, "-doubled", keep=2)
    assert published.name == "step_0000007-doubled"
    assert latest_checkpoint(tmp_path) == published
    after = load_checkpoint(published)
    assert after["step"] == 7 and after["note"] == "after"
    assert torch.equal(after["model"]["w"], 2 * torch.arange(12.0).view(3, 4))
    moments = after["optimizer"]["state"]["w"]
    assert torch.equal(moments["exp_avg"], torch.arange(12.0).view(3, 4) / 5)
    assert moments["step"] == 7
    assert after["optimizer"]["param_groups"][0]["params"] == ["w"]
    old = load_checkpoint(before)
    assert old["note"] == "before"
    assert torch.equal(old["model"]["w"], torch.arange(12.0).view(3, 4))


def test_a_failed_transform_publishes_nothing(tmp_path):
    before = _saved(tmp_path)

    def fail(whole: Whole) -> None:
        whole.train_state["note"] = "half done"
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        transform_checkpoint(before, fail, "-failed", keep=2)
    assert complete_checkpoints(tmp_path) == [before]
    assert latest_checkpoint(tmp_path) == before
    assert load_checkpoint(before)["note"] == "before"
