"""The processes of a run: torchrun's environment, the process group and
the device mesh.

``torchrun --nproc-per-node N -m coom train ...`` starts N processes with
WORLD_SIZE, RANK and LOCAL_RANK set; a plain ``coom train`` is a world of
one and never touches torch.distributed. The process group uses NCCL on
GPUs and gloo on CPUs. The mesh has one named dimension per kind of
parallelism: pipeline ("pp") outermost, then data_parallel_replicate
("dp_replicate"), data_parallel_shard ("dp_shard") and tensor ("tp"), so
that a tensor parallel group is neighbouring ranks (one machine). The
data-parallel rank of a process, which picks its share of each global
batch, runs over both data-parallel dimensions; the processes of a
tensor-parallel group, and a pipeline's stages, see the same data.

Expert parallelism borrows its processes from data_parallel_shard, as
torchtitan does: they see different tokens, and exchange them. With
``expert`` > 1 a second mesh over the same processes splits dp_shard into
"dp_shard_out" x "ep", the expert-parallel group innermost (neighbouring
ranks, whose all-to-alls are the busiest traffic). The dense parameters
keep the first mesh; the routed experts split by expert over "ep" and
shard over "dp_shard_out" (with "dp_replicate", HSDP).
"""
import gc
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from coom.config import ParallelConfig
from coom.errors import UserError

DATA_PARALLEL = ("dp_replicate", "dp_shard")
PIPELINE = "pp"
EXPERT = "ep"
EXPERT_SHARD = "dp_shard_out"
"""The part of dp_shard outside the expert-parallel group."""
TENSOR = "tp"


def launched_world_size() -> int:
    """Processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_device(device: torch.device) -> torch.device:
    """device, on a GPU the one of this process's local rank."""
    if device.type != "cuda" or launched_world_size() == 1:
        return device
    local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(local)
    return local


def degrees(config: ParallelConfig, world: int) -> dict[str, int]:
    """Size of each mesh dimension, data_parallel_shard's -1 filled in;
    their product must be the world size."""
    pipeline, replicate, shard, tensor = config.pipeline, \
        config.data_parallel_replicate, config.data_parallel_shard, \
        config.tensor
    others = f"pipeline {pipeline} x data_parallel_replicate {replicate} " \
        f"x tensor {tensor}"
    if shard == -1:
        if world % (pipeline * replicate * tensor):
            raise UserError(f"config section parallel: {others} does not "
                            f"divide the {world} processes")
        shard = world // (pipeline * replicate * tensor)
    if pipeline * replicate * shard * tensor != world:
        raise UserError(
            f"config section parallel: {others} x data_parallel_shard "
            f"{shard} = {pipeline * replicate * shard * tensor} processes, "
            f"but {world} were started; make the degrees multiply to the "
            "number of processes (or set data_parallel_shard=-1)")
    if shard % config.expert:
        raise UserError(
            f"config section parallel: expert {config.expert} does not "
            f"divide data_parallel_shard {shard}; expert-parallel "
            "processes are taken from data_parallel_shard's")
    return {PIPELINE: pipeline, "dp_replicate": replicate,
            "dp_shard": shard, TENSOR: tensor}


@dataclass
class World:
    """This process's place among the run's processes."""

    rank: int
    size: int
    mesh: Optional[DeviceMesh]
    """None in a world of one."""

    expert_mesh: Optional[DeviceMesh] = None
    """The view of mesh whose dp_shard is split into dp_shard_out x ep,
    under expert parallelism; None without."""

    device: Optional[torch.device] = None
    """Where this process's collectives put their tensors."""

    owns_process_group: bool = False
    """Whether start_world joined the process group, which close then
    leaves; one joined before (a caller running several runs in one
    launch) stays."""

    control: Optional[dist.ProcessGroup] = None
    """A gloo group of every process, for what the hosts agree on (votes,
    the energy ledger's sums) where the default group is NCCL's: a vote
    through NCCL would wait for every kernel queued before it, and leave
    the GPU idle while the host goes on. None: the default group."""

    @property
    def main(self) -> bool:
        """Whether this process writes the run's files."""
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """Index of this process's share of each global batch."""
        if self.mesh is None:
            return 0
        return self.mesh["dp_replicate"].get_local_rank() \
            * self.mesh["dp_shard"].size() \
            + self.mesh["dp_shard"].get_local_rank()

    @property
    def data_size(self) -> int:
        """How many shares each global batch is cut into."""
        if self.mesh is None:
            return 1
        return self.mesh[DATA_PARALLEL].size()

    @property
    def tensor_size(self) -> int:
        return 1 if self.mesh is None else self.mesh[TENSOR].size()

    @property
    def pipeline_size(self) -> int:
        """Processes the pipeline's stages are spread over."""
        return 1 if self.mesh is None else self.mesh[PIPELINE].size()

    @property
    def pipeline_rank(self) -> int:
        return 0 if self.mesh is None else \
            self.mesh[PIPELINE].get_local_rank()

    @property
    def expert_size(self) -> int:
        """Processes the routed experts are split over."""
        if self.expert_mesh is None:
            return 1
        return self.expert_mesh[EXPERT].size()

    def data_mesh(self) -> DeviceMesh:
        """The mesh FSDP shards over: both data-parallel dimensions
        (HSDP) when data_parallel_replicate > 1, else data_parallel_shard
        alone."""
        if self.mesh["dp_replicate"].size() > 1:
            return self.mesh[DATA_PARALLEL]
        return self.mesh["dp_shard"]

    def expert_data_mesh(self) -> DeviceMesh:
        """The mesh FSDP shards the routed experts over: data_mesh less
        the expert-parallel dimension, which splits them by expert. It
        may be of one process."""
        if self.mesh["dp_replicate"].size() > 1:
            return self.expert_mesh["dp_replicate", EXPERT_SHARD]
        return self.expert_mesh[EXPERT_SHARD]

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """tensor summed over the data-parallel processes (those that see
        different data), in place."""
        if self.mesh is not None:
            for name in DATA_PARALLEL:
                if self.mesh[name].size() > 1:
                    dist.all_reduce(tensor, group=self.mesh[name].get_group())
        return tensor

    def pipeline_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """tensor summed over the pipeline's processes, in place."""
        if self.pipeline_size > 1:
            dist.all_reduce(tensor, group=self.mesh[PIPELINE].get_group())
        return tensor

    def pipeline_gather(self, value) -> list:
        """value (any picklable object) of each process of this one's
        pipeline, by pipeline rank."""
        if self.pipeline_size == 1:
            return [value]
        values = [None] * self.pipeline_size
        dist.all_gather_object(values, value,
                               group=self.mesh[PIPELINE].get_group())
        return values

    def tensor_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """tensor summed over the tensor-parallel group, in place."""
        if self.tensor_size > 1:
            dist.all_reduce(tensor, group=self.mesh[TENSOR].get_group())
        return tensor

    def barrier(self) -> None:
        if self.mesh is not None:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """Whether flag holds on any process of the run; every process
        takes part. Decisions that lead to collectives (stopping, with a
        checkpoint every process writes) must be the same everywhere."""
        return bool(self.maximum(int(flag)))

    def maximum(self, value: int) -> int:
        """The largest of value over the run's processes, agreed by the
        hosts (``control``); every process takes part."""
        if self.mesh is None:
            return value
        votes = torch.tensor([value])
        dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=self.control)
        return int(votes.item())

    def host_sum(self, values: list[float]) -> list[float]:
        """values summed over the run's processes by the hosts
        (``control``), in float64; every process takes part."""
        if self.mesh is None:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, group=self.control)
        return tensor.tolist()

    def close(self) -> None:
        """Leave the process group, once the run is over.

        Objects in reference cycles (a model's hooks, say) that hold
        gloo's process groups are otherwise freed at the interpreter's
        exit, which then aborts at times ("terminate called without an
        active exception"): 3 to 5 of 20 runs of a two-process script,
        and none of 30 with a collection before leaving. The caller drops
        its references to the model first.
        """
        if self.mesh is not None and dist.is_initialized():
            gc.collect()
            if self.owns_process_group:
                dist.destroy_process_group()
            elif self.control is not None:
                dist.destroy_process_group(self.control)


def start_world(config: ParallelConfig, device: torch.device,
                size: Optional[int] = None) -> World:
    """Join torchrun's process group (unless this process has joined it
    already) and build the mesh; a world of one without torchrun. size,
    torchrun's processes by default, is the group's size: a planner that
    has joined a fake group of any size gives it."""
    size = size or launched_world_size()
    shape = degrees(config, size)
    if size == 1:
        return World(0, 1, None)
    joining = not dist.is_initialized()
    if joining:
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo")
    mesh = init_device_mesh(device.type, tuple(shape.values()),
                            mesh_dim_names=tuple(shape))
    expert = config.expert
    experts = None
    if expert > 1:
        # A second mesh over the same ranks, in the same order, with
        # dp_shard split; its own process groups. (DeviceMesh._unflatten
        # would share the first mesh's, but torch 2.11 lacks this use.)
        split = {PIPELINE: shape[PIPELINE],
                 "dp_replicate": shape["dp_replicate"],
                 EXPERT_SHARD: shape["dp_shard"] // expert, EXPERT: expert,
                 TENSOR: shape[TENSOR]}
        experts = init_device_mesh(device.type, tuple(split.values()),
                                   mesh_dim_names=tuple(split))
    # The default group carries the hosts' tensors itself where it has a
    # gloo (or the planner's fake) backend.
    backend = dist.get_backend()
    control = None if "gloo" in backend or backend == "fake" \
        else dist.new_group(backend="gloo")
    return World(dist.get_rank(), size, mesh, experts, device, joining,
                 control)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of tensor (a DTensor's local shard, which
    in-place operations write through), or tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
