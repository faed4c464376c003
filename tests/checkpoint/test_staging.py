"""The background checkpoint's CPU buffers: a copy that later updates do
not reach, made into the same buffers at every checkpoint, with the
state dict's other values as they are."""
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from coom.checkpoint.staging import KeptBuffers


def _state(scale: float) -> dict:
    weight = torch.arange(6.0).view(2, 3) * scale
    return {"model": {"w": weight, "wt": weight.T},
            "optimizer": {"state": {"w": {"step": torch.tensor(scale)}},
                          "param_groups": [{"lr": 0.1, "betas": (0.9,
                                                                 0.95),
                                            "params": ["w"]}]}}


def test_copies_are_kept_apart_and_their_buffers_reused():
    stager = KeptBuffers()
    state = _state(1.0)
    first = stager.stage(state)
    state["model"]["w"].add_(100)
    assert torch.equal(first["model"]["w"], _state(1.0)["model"]["w"])
    assert torch.equal(first["model"]["wt"], _state(1.0)["model"]["wt"])
    assert first["optimizer"]["param_groups"] == \
        state["optimizer"]["param_groups"]
    kept = {name: buffer.data_ptr()
            for name, buffer in stager.buffers.items()}
    second = stager.stage(_state(2.0))
    assert torch.equal(second["model"]["w"], _state(2.0)["model"]["w"])
    assert second["optimizer"]["state"]["w"]["step"].item() == 2.0
    assert {name: buffer.data_ptr()
            for name, buffer in stager.buffers.items()} == kept


def test_a_new_shape_gets_a_new_buffer():
    stager = KeptBuffers()
    stager.stage({"w": torch.zeros(2)})
    staged = stager.stage({"w": torch.ones(3)})
    assert torch.equal(staged["w"], torch.ones(3))


def test_a_dtensor_keeps_its_layout_around_the_kept_buffer():
    """A DTensor's staged copy is its layout around the CPU buffer
    itself (not a copy of it on the mesh's device)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0,
                            world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        weight = distribute_tensor(torch.arange(8.0).view(4, 2), mesh,
                                   [Shard(0)])
        stager = KeptBuffers()
        staged = stager.stage({"w": weight})["w"]
        (buffer,) = stager.buffers.values()
        assert staged.placements == weight.placements
        assert staged.to_local().data_ptr() == buffer.data_ptr()
        assert torch.equal(staged.full_tensor(), weight.full_tensor())
    finally:
        dist.destroy_process_group()
