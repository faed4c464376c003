"""parallelize(): the single-device model spread over the run's mesh,
applied from outside the model as torchtitan does, in this order:

1. Tensor parallelism (``parallelize_module`` over the "tp" dimension):
   in each block, MLA's query projection (``wq`` or ``wq_b``) and its
   key-value up-projection ``wkv_b`` split by heads (column-wise), its
   output projection ``wo`` row-wise; the dense and shared-expert
   feed-forwards split their hidden units (``w1``, ``w3`` column-wise,
   ``w2`` row-wise). A row-wise product all-reduces its output, so every
   process of the group holds the whole activation between them.
   The embedding and output head split by vocabulary: a process looks
   up the tokens of its rows (the group sums the embeddings) and
   computes its rows' logits, whose cross-entropy sums over the group
   (the head is replaced by ``coom.parallel.vocab.VocabParallelHead``).
   Norms, MLA's latent projection ``wkv_a``, router and routed experts
   stay whole on every process; the gradient of the rotary key part of
   ``wkv_a``'s output, which every process's heads share, is summed over
   the group.
   With sequence parallelism (Megatron's), the residual stream between
   the main blocks' sublayers is split by sequence over the group too:
   each process keeps and normalises its own positions; a sublayer
   gathers the sequence on entry (attention and feed-forward read every
   position) and its row-wise product reduce-scatters rather than
   all-reduces on exit. The routed experts and router, whole on every
   process, read the gathered sequence and keep their positions of the
   output. The first block splits the embedding's output, the last block
   gathers its own (each pipeline stage's, under pipeline parallelism),
   so the head, MTP modules, losses and stages' exchanges are unchanged.
   The norms' gradients then are partial per process, and the built
   model sums them over the group (``sum_sequence_parallel_gradients``,
   called by ``coom.parallel.model``).
2. Expert parallelism (``coom.parallel.expert``) over the "ep"
   dimension: each MoE layer's routed experts split by expert, their
   token copies sent to them and back with all-to-alls.
3. FSDP2 (``fully_shard``) over the data-parallel dimensions, on each
   block (main and MTP) and then on the whole model: each block's
   parameters are gathered just before it runs and, in a step's last
   micro-batch, its gradients reduce-scattered just after (the earlier
   micro-batches' are summed unsharded meanwhile,
   ``coom.parallel.model``); the model's own parameters (embedding,
   head) are gathered by its forward. With
   data_parallel_replicate > 1 the mesh has two dimensions (HSDP). Under
   expert parallelism the routed experts are sharded first, on their own,
   over the data-parallel dimensions less "ep". Under pipeline
   parallelism the stages take the whole model's place, and under its
   zero-bubble schedules each stage is one unit (no block is).

FSDP averages gradients over the data-parallel processes; each process's
loss is its share of the global batch's mean, so what it differentiates
is scaled by the number of data-parallel processes
(``coom.parallel.objective``) and the average is the single-process
gradient.
A routed expert's gradient has already been summed over its
expert-parallel group by the all-to-alls' backward, and FSDP sums it over
the rest, so it is divided by all the data-parallel processes too, not
by the processes that shard it.
"""
from typing import Optional

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    PrepareModuleOutput,
    RowwiseParallel,
    parallelize_module,
)

from coom.config import ZERO_BUBBLE, ParallelConfig
from coom.layers.mlp import SwiGLU
from coom.layers.moe import MoE
from coom.parallel.expert import ExpertParallel
from coom.parallel.mesh import EXPERT, EXPERT_SHARD, TENSOR, World
from coom.parallel.precision import mixed_precision
from coom.parallel.vocab import VocabParallelHead


def _feed_forward_plan(prefix: str) -> dict:
    return {f"{prefix}.w1": ColwiseParallel(),
            f"{prefix}.w3": ColwiseParallel(),
            f"{prefix}.w2": RowwiseParallel()}


def _tensor_plan(block: nn.Module) -> dict:
    """Module names in a block and how each splits."""
    query = "wq" if hasattr(block.attention, "wq") else "wq_b"
    plan = {f"attention.{query}": ColwiseParallel(),
            "attention.wkv_b": ColwiseParallel(),
            "attention.wo": RowwiseParallel()}
    if isinstance(block.mlp, SwiGLU):
        plan |= _feed_forward_plan("mlp")
    elif isinstance(block.mlp, MoE) and block.mlp.shared_experts is not None:
        plan |= _feed_forward_plan("mlp.shared_experts")
    return plan


SEQUENCE = Shard(1)
"""Placement of a (b, s, d) activation split by sequence."""
BLOCK_INPUTS = 3
"""A block's and its attention's arguments: x, rope, cache."""


def _gathered_on_entry(arguments: int) -> PrepareModuleInput:
    """A sublayer whose first argument arrives split by sequence and is
    gathered whole."""
    rest = (None,) * (arguments - 1)
    return PrepareModuleInput(input_layouts=(SEQUENCE, *rest),
                              desired_input_layouts=(Replicate(), *rest),
                              use_local_output=True)


def _sequence_parallel_plan(block: nn.Module) -> dict:
    """_tensor_plan with the block's residual stream split by sequence."""
    plan = _tensor_plan(block)
    plan["attention"] = _gathered_on_entry(BLOCK_INPUTS)
    plan["attention.wo"] = RowwiseParallel(output_layouts=SEQUENCE)
    if isinstance(block.mlp, SwiGLU):
        plan["mlp"] = _gathered_on_entry(1)
        plan["mlp.w2"] = RowwiseParallel(output_layouts=SEQUENCE)
    else:
        # Router and routed experts are whole on every process: the
        # output is whole, and each keeps its positions of it.
        plan["mlp"] = PrepareModuleInputOutput(
            input_layouts=(SEQUENCE,), desired_input_layouts=(Replicate(),),
            use_local_input=True, output_layouts=(Replicate(),),
            desired_output_layouts=(SEQUENCE,))
    return plan


def _split_stream_ends(first: nn.Module, last: nn.Module, mesh) -> None:
    """The first block splits its input by sequence, the last gathers its
    output (one block may be both)."""
    rest = (None,) * (BLOCK_INPUTS - 1)
    split = dict(input_layouts=(Replicate(), *rest),
                 desired_input_layouts=(SEQUENCE, *rest))
    gather = dict(output_layouts=(SEQUENCE,),
                  desired_output_layouts=(Replicate(),))
    if first is last:
        parallelize_module(first, mesh, PrepareModuleInputOutput(
            **split, use_local_input=True, **gather))
        return
    parallelize_module(first, mesh,
                       PrepareModuleInput(**split, use_local_output=True))
    parallelize_module(last, mesh, PrepareModuleOutput(**gather))


def sum_sequence_parallel_gradients(model: nn.Module, world: World
                                    ) -> None:
    """After the backward under sequence parallelism: the gradients of
    the main blocks' norms, each process's from its own positions of the
    split stream, summed over the tensor-parallel group (Megatron does
    the same)."""
    for block in model.layers.values():
        for norm in (block.attention_norm, block.mlp_norm):
            for parameter in norm.parameters():
                grad = parameter.grad
                if grad is not None:
                    world.tensor_sum(grad.to_local()
                                     if isinstance(grad, DTensor) else grad)


def _sum_gradient_over(mesh: DeviceMesh, x: torch.Tensor) -> torch.Tensor:
    """x unchanged; its gradient summed over mesh's processes."""
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False) \
        .to_local(grad_placements=[Partial()])


def _sum_rope_key_gradient(mesh: DeviceMesh, latent_width: int):
    """A forward hook for ``wkv_a``: each process attends with its own
    heads, all of which share the rotary key part of wkv_a's output, so
    that part's gradient is partial per process and is summed. (The
    latent part reaches the heads through ``wkv_b``, whose column-wise
    split sums its gradient already.)"""
    def hook(module, args, output_bsw):
        latent, rope = output_bsw.split(
            [latent_width, output_bsw.shape[-1] - latent_width], dim=-1)
        return torch.cat([latent, _sum_gradient_over(mesh, rope)], dim=-1)
    return hook


def _split_head(model: nn.Module, stages: list[nn.Module],
                mesh: DeviceMesh) -> None:
    """The vocabulary-parallel head in place of model's, and of the stage
    that shares it."""
    head = model.head
    model.head = VocabParallelHead(head, mesh)
    for stage in stages:
        if stage.head is head:
            stage.head = model.head


def _shard_experts(moe_layers: list[MoE], world: World,
                   sharding: dict) -> None:
    """FSDP on each layer's expert-parallel routed experts, before their
    block's, which then leaves them out. Their mesh may be of one
    process: FSDP then only divides the gradient, which it must."""
    mesh = world.expert_data_mesh()
    for moe in moe_layers:
        fully_shard(moe.experts, mesh=mesh, **sharding)
        moe.experts.set_gradient_divide_factor(world.data_size)
        # A divide factor asks for NCCL's PREMUL_SUM, which gloo lacks:
        # sum, then divide (the same on NCCL, one more pass). Not when
        # the experts' reduce-scatter group is one process: FSDP then
        # divides by the factor itself, and would divide twice (torch
        # 2.13; measured by the ep2 layout test).
        if world.expert_mesh[EXPERT_SHARD].size() > 1:
            moe.experts.set_force_sum_reduction_for_comms(True)


def sharded(world: World, pipelined: bool) -> bool:
    """Whether parallelize applies FSDP: in every world of several
    processes, even over one data-parallel process (tensor parallelism
    alone): every parameter is then a DTensor, which the fused optimizer
    needs (it cannot mix them with plain tensors), and the optimizer's
    state has the same form at every layout. Not under pipeline
    parallelism alone, where it has nothing to shard; the optimizer then
    sees only plain tensors."""
    return shards(world.size, pipelined, world.data_size,
                  world.tensor_size)


def shards(size: int, pipelined: bool, data_size: int,
           tensor_size: int) -> bool:
    """``sharded`` for a world of size processes, data_size of them
    data-parallel and tensor_size tensor-parallel."""
    return size > 1 and not (pipelined and data_size == tensor_size == 1)


def keeps_gathered(model: nn.Module, parallel: ParallelConfig,
                   dtype: torch.dtype) -> bool:
    """Whether FSDP's units keep their gathered weights from a step's
    first forward to its last backward (``parallel.fsdp_reshard``)."""
    if parallel.fsdp_reshard != "auto":
        return parallel.fsdp_reshard == "step"
    device = next(model.parameters()).device
    if device.type != "cuda":
        return False
    gathered = sum(p.numel() for p in model.parameters()) * dtype.itemsize
    return gathers_once(gathered, parallel,
                        torch.cuda.get_device_properties(device).total_memory)


def gathers_once(gathered: int, parallel: ParallelConfig,
                 memory: int) -> bool:
    """fsdp_reshard 'auto''s rule: whether the units of a process whose
    parameters take gathered bytes in the compute dtype stay gathered
    for a step on a GPU of memory bytes."""
    return parallel.pipeline == 1 and gathered < memory / 10


def parallelize(model: nn.Module, world: World, parallel: ParallelConfig,
                dtype: torch.dtype = torch.float32,
                stages: Optional[list[nn.Module]] = None,
                keep_gathered: bool = False) -> nn.Module:
    """model spread over world's mesh, in place; unchanged in a world of
    one. FSDP's units compute in dtype (``coom.parallel.precision``) and,
    with keep_gathered, stay gathered after their forwards (the built
    model keeps them gathered after the backwards of a step's micro-
    batches but the last, ``coom.parallel.model``). Under pipeline
    parallelism model holds this process's parts and stages
    (``coom.parallel.pipeline``) run them: each stage, rather than the
    model, is then an FSDP root."""
    if world.mesh is None:
        return model
    policy = mixed_precision(dtype)
    sharding = dict(mp_policy=policy)
    if keep_gathered:
        sharding["reshard_after_forward"] = False
    blocks = model.blocks()
    if world.tensor_size > 1:
        mesh = world.mesh[TENSOR]
        # The main blocks split the stream; MTP's read the whole sequence.
        split_blocks = list(model.layers.values()) \
            if parallel.sequence_parallel else []
        for block in blocks:
            plan = _sequence_parallel_plan(block) if block in split_blocks \
                else _tensor_plan(block)
            parallelize_module(block, mesh, plan)
            block.attention.wkv_a.register_forward_hook(
                _sum_rope_key_gradient(mesh, block.attention.kv_norm
                                       .weight.shape[0]))
        if split_blocks:
            # Each stage (or the whole model) splits and gathers the
            # stream at its own ends.
            for part in stages or [model]:
                ends = list(part.layers.values())
                _split_stream_ends(ends[0], ends[-1], mesh)
        if model.embed is not None:
            parallelize_module(model, mesh, {
                "embed": RowwiseParallel(input_layouts=Replicate())})
        if model.head is not None:
            _split_head(model, stages or [], mesh)
    if world.expert_size > 1:
        moe_layers = list(model.moe_layers().values())
        for moe in moe_layers:
            moe.experts = ExpertParallel(moe.experts,
                                         world.expert_mesh[EXPERT])
        _shard_experts(moe_layers, world, sharding)
    # Under the zero-bubble schedules each stage is one FSDP unit: torch
    # 2.13 runs their split backward's weight half after an inner unit (a
    # block) has reduced its gradients, which then miss some
    # micro-batches (measured: the last stage's blocks, under DualPipeV).
    if sharded(world, bool(stages)):
        mesh = world.data_mesh()
        units = [] if stages and parallel.pipeline_schedule in ZERO_BUBBLE \
            else blocks
        for module in [*units, *(stages or [model])]:
            fully_shard(module, mesh=mesh, **sharding)
    return model
