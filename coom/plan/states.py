"""The bytes a process holds for the whole step, read off its model.

Counted from the process's model as ``coom.plan.ranks`` builds it, in the
storage the allocator gives them:

- *parameters*: the float32 master weights; under FSDP each one's padded
  shard (``FSDPParam._sharded_param_data``), else the local tensor.
- *gradients*: float32, of the same storage as the parameters (FSDP
  reduce-scatters into padded shards); in bf16 on the compute copies
  where a step outside FSDP has one micro-batch.
- *optimizer states*: AdamW's two moments (float32, or bf16 with
  ``optimizer.moments_dtype``) of every parameter's local, unpadded
  elements, plus a 4-byte step count per parameter.
- *compute copies*: outside FSDP, in bf16, the copies every parameter
  has for the step (``ComputeWeights``).
- *gathered weights*: under FSDP with ``fsdp_reshard`` 'step', every
  unit's bf16 weights, gathered for the whole step.
- *gradient accumulation*: under FSDP, when a data-parallel process runs
  several micro-batches a step, the float32 unsharded gradients FSDP sums
  them in until the last one's reduce-scatter.
- *buffers*: the rotary tables and the routers' balancing biases, whole
  on every process.
"""
from dataclasses import dataclass

import torch
from torch.distributed.fsdp import FSDPModule

from coom.parallel.mesh import local_tensor
from coom.parallel.model import ParallelModel
from coom.train.optimizer import moments_dtype

MASTER = torch.float32.itemsize
STEP_COUNT = torch.float32.itemsize


@dataclass(frozen=True)
class Term:
    """One named amount of memory on a process."""

    name: str
    bytes: int
    note: str = ""


def fsdp_groups(model: ParallelModel) -> list:
    """The FSDP units (param groups) of model; under pipelining the
    stages are roots, outside the model's modules."""
    roots = [*model.model.modules(),
             *(model.pipeline.stages if model.pipeline else [])]
    groups = {}
    for module in roots:
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            if group is not None:
                groups[id(group)] = group
    return list(groups.values())


def _gradients(model: ParallelModel, stored: int) -> Term:
    """The step's gradients: float32, or in a step of one micro-batch
    outside FSDP the compute copies' own (``ComputeWeights``)."""
    if model.weights is not None and model.weights.keep_gradients:
        return Term("gradients", stored * model.dtype.itemsize,
                    "bf16, the compute copies' (one micro-batch a step)")
    return Term("gradients", stored * MASTER, "float32")


def state_terms(model: ParallelModel, micro_batches: int,
                moments: str = "auto") -> list[Term]:
    """What model's process holds for the whole step, when it runs
    micro_batches micro-batches a step and AdamW keeps its moments as
    moments (``optimizer.moments_dtype``) says."""
    parameters = list(model.model.parameters())
    local = sum(local_tensor(p).numel() for p in parameters)
    sharded = [param for group in fsdp_groups(model)
               for param in group.fsdp_params]
    if sharded:
        stored = sum(p._sharded_param_data.numel() for p in sharded)
        whole = sum(p._orig_size.numel() for p in sharded)
    else:
        stored, whole = local, 0
    compute = model.dtype.itemsize
    moments_kept = moments_dtype(moments, model.dtype)
    terms = [
        Term("parameters", stored * MASTER, "float32 masters"
             + (", FSDP shards (padded)" if sharded else "")),
        _gradients(model, stored),
        Term("optimizer states",
             local * 2 * moments_kept.itemsize
             + len(parameters) * STEP_COUNT,
             "AdamW moments, " + ("bf16" if moments_kept == torch.bfloat16
                                  else "float32")),
    ]
    if model.weights is not None:
        terms.append(Term("compute copies", local * compute,
                          "bf16 copies, made once a step"))
    if sharded and model.keep_gathered:
        terms.append(Term("gathered weights", whole * compute,
                          "FSDP units kept gathered for the step"))
    if sharded and micro_batches > 1:
        terms.append(Term("gradient accumulation", whole * MASTER,
                          "float32, unsharded, until the last "
                          "micro-batch's reduce-scatter"))
    buffers = sum(b.nbytes for b in model.model.buffers())
    terms.append(Term("buffers", buffers, "rotary tables, router biases, "
                      "FP8 weights' kept forms"))
    return terms
