"""The parallel section: the degree of each kind of parallelism."""
from dataclasses import dataclass
from typing import Literal

from coom.config.checks import positive, require

ZERO_BUBBLE = ("InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")
"""Pipeline schedules that split each backward into input and weight
gradients."""


@dataclass
class ParallelConfig:
    """How a run launched with torchrun spreads over its processes: the
    degree of each kind of parallelism (``coom/parallel``,
    ``docs/distributed.md``). Their product is the world size."""

    data_parallel_replicate: int = 1
    """Data-parallel groups that each hold a full copy of the model
    (Megatron: the data-parallel size outside the distributed optimizer;
    with data_parallel_shard > 1 this is HSDP)."""

    data_parallel_shard: int = -1
    """Data-parallel processes that shard parameters, gradients and
    optimizer states among them (FSDP2); -1 takes whatever the other
    degrees leave of the world size."""

    tensor: int = 1
    """Tensor parallel degree (Megatron: tensor_model_parallel_size): MLA's
    query, key-value and output projections and the dense and shared
    expert feed-forwards split by heads and hidden units, the embedding
    and output head by vocabulary; norms, router and routed experts
    replicated (see sequence_parallel). Not yet with FP8."""

    expert: int = 1
    """Expert parallel degree (Megatron: expert_model_parallel_size): the
    routed experts split by expert over this many processes, which send
    each other their token copies with all-to-alls. They are taken from
    data_parallel_shard, which it must divide; the experts shard (FSDP)
    over the rest of the data-parallel processes. ``coom experts
    rebalance`` plans which rank holds which expert, with optional copies
    of hot ones."""

    pipeline: int = 1
    """Pipeline parallel degree (Megatron: pipeline_model_parallel_size):
    the blocks cut into stages that run on this many processes, each
    global batch's micro-batches flowing through them
    (``coom/parallel/pipeline.py``), each stage with its own tensor or
    expert parallelism if asked. Not yet with a tied embedding and head,
    nor with expert parallelism under the zero-bubble schedules."""

    pipeline_schedule: Literal[
        "1F1B", "GPipe", "Interleaved1F1B", "LoopedBFS",
        "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"] = "1F1B"
    """The order in which stages run their micro-batches' forwards and
    backwards (torch.distributed.pipelining's schedules). 1F1B and GPipe
    give each process one stage; the others give it
    pipeline_stages_per_process, looped (Interleaved1F1B, LoopedBFS,
    InterleavedZeroBubble) or in a V (ZBVZeroBubble, DualPipeV:
    DeepSeek-V3's DualPipe, whose first process also holds the last
    stage)."""

    pipeline_stages_per_process: int = 2
    """Stages each process holds under the multi-stage schedules (2 for
    the V-shaped ones); ignored by 1F1B and GPipe."""

    sequence_parallel: bool = False
    """With tensor > 1, also split the residual stream between the main
    blocks' sublayers by sequence over the tensor-parallel group
    (Megatron's sequence parallelism): its norms and activations take
    1 / tensor of the memory. data.seq_length must then split over
    tensor."""

    fsdp_reshard: Literal["auto", "micro_batch", "step"] = "auto"
    """When each FSDP unit frees its gathered bf16 compute weights:
    after every forward and backward ('micro_batch', as ZeRO-3: the
    least memory, two all-gathers per unit and micro-batch), or once the
    step's last backward is done ('step': one all-gather per unit and
    step, for the memory of this process's whole model in bf16). 'auto'
    takes 'step' where that memory is under a tenth of the GPU's and
    the model is not pipelined (the pipeline's schedule reshards its
    stages itself), else 'micro_batch'."""

    context: int = 1
    """Context parallel degree, reserved: must be 1."""

    def __post_init__(self):
        positive(self, "data_parallel_replicate", "tensor", "expert",
                 "pipeline", "pipeline_stages_per_process", "context")
        require(self.data_parallel_shard == -1
                or self.data_parallel_shard > 0, "data_parallel_shard",
                "must be positive, or -1 for the rest of the world size")
        require(self.context == 1, "context",
                "is not supported yet: COOM parallelises over data "
                "(data_parallel_replicate, data_parallel_shard), tensor, "
                "expert and pipeline only")
        require(self.tensor > 1 or not self.sequence_parallel,
                "sequence_parallel", "splits the sequence over the "
                "tensor-parallel processes; set tensor > 1 or "
                "sequence_parallel=false")
        require(self.pipeline_stages_per_process == 2 or
                self.pipeline_schedule not in ("ZBVZeroBubble",
                                               "DualPipeV"),
                "pipeline_stages_per_process", "must be 2 for the "
                f"V-shaped schedule {self.pipeline_schedule}")
        require(self.pipeline == 1 or self.expert == 1
                or self.pipeline_schedule not in ZERO_BUBBLE,
                "pipeline_schedule", f"{self.pipeline_schedule} does not "
                "run with expert parallelism yet (the routed experts are "
                "FSDP units of their own, which reduce their gradients "
                "before these schedules compute them); use 1F1B or "
                "Interleaved1F1B, or parallel.expert=1")
        shard, expert = self.data_parallel_shard, self.expert
        require(shard == -1 or shard % expert == 0, "expert",
                f"{expert} does not divide data_parallel_shard {shard}; "
                "expert-parallel processes are taken from "
                "data_parallel_shard's")

    @property
    def pipeline_stages(self) -> int:
        """Stages the blocks are cut into."""
        if self.pipeline_schedule in ("1F1B", "GPipe"):
            return self.pipeline
        return self.pipeline * self.pipeline_stages_per_process
