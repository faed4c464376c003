"""The model as the trainer drives it, whatever the layout: forward and
backward over a step's micro-batches, evaluation, gradient clipping, and
the reductions between them.

``coom.parallel.build`` makes it. Without pipeline parallelism each
micro-batch runs the model's forward (under FSDP, its root) and its
backward; with it, the pipeline's schedule runs them over the stages.
Either way the step's loss sums come back whole on every process.

Tensor names end in their shape: b micro-batch; s sequence.
"""
import contextlib
from typing import Optional

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from coom.data.loader import Batch
from coom.fp8.filter import Choice
from coom.fp8.weights import refresh as refresh_kept
from coom.kernels.autocast import autocast_to
from coom.layers.mla import preferred_attention
from coom.models.transformer import Transformer
from coom.parallel.balance import ExpertBalancer
from coom.parallel.mesh import World
from coom.parallel.objective import training_objective
from coom.parallel.parallelize import sum_sequence_parallel_gradients
from coom.parallel.pipeline import Pipeline
from coom.parallel.precision import ComputeWeights


def _total_norm(gradients: list[torch.Tensor]) -> torch.Tensor:
    """The gradients' 2-norm, summed in float32 also for bf16 gradients
    (each read as the float32 it equals): torch's total norm, whose
    per-tensor norms would be rounded to bf16."""
    if all(gradient.dtype == torch.float32 for gradient in gradients):
        return torch.nn.utils.get_total_norm(gradients)
    norms = torch._foreach_norm(gradients, 2.0, dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack(norms))


def _stack(batches: list[Batch]) -> Batch:
    """Micro-batches as one batch."""
    return Batch(*(torch.cat([getattr(batch, key) for batch in batches])
                   for key in ("tokens", "labels", "loss_mask")))


class ParallelModel:
    """This process's part of the model, spread over the run's layout.

    Args:
        model: this process's parts of the model, parallelised.
        world: the run's processes.
        pipeline: its stages and schedule, under pipeline parallelism.
        balancer: the MoE layers' balancing (``coom.parallel.balance``).
        device: this process's device.
        dtype: the dtype forwards compute in (bf16 or float32).
        weights: the bf16 compute weights outside FSDP, if any
            (``coom.parallel.precision``).
        keep_gathered: whether FSDP's units stay gathered between a
            step's micro-batches (``parallel.fsdp_reshard``).
        sequence_parallel: whether norms' gradients are partial per
            tensor-parallel process (``coom.parallel.parallelize``).
        keep_fp8_forms: whether the FP8 weights' forms are kept between
            optimizer steps (``coom.fp8.weights``): where a step has
            several micro-batches; with one, keeping them would only
            cost memory.
        fp8_choices: what ``coom.fp8.convert`` did with each product
            it considered.
    """

    def __init__(self, model: Transformer, world: World,
                 pipeline: Optional[Pipeline], balancer: ExpertBalancer,
                 device: torch.device, dtype: torch.dtype,
                 weights: Optional[ComputeWeights], keep_gathered: bool,
                 sequence_parallel: bool, keep_fp8_forms: bool,
                 fp8_choices: list[Choice]):
        self.model = model
        self.world = world
        self.pipeline = pipeline
        self.balancer = balancer
        self.device = device
        self.dtype = dtype
        self.weights = weights
        self.keep_gathered = keep_gathered
        self.sequence_parallel = sequence_parallel
        self.keep_fp8_forms = keep_fp8_forms
        self.fp8_choices = fp8_choices

    def compute(self) -> contextlib.ExitStack:
        """The context a step's (or an evaluation's) forwards and
        backwards run in: the compute weights, with their kept FP8 forms
        up to date (``refresh_fp8_forms``), autocast to their dtype for
        any float32 activation, the preferred attention kernel."""
        with contextlib.ExitStack() as stack:
            if self.weights is not None:
                stack.enter_context(self.weights.swapped_in())
            self.refresh_fp8_forms()
            if self.dtype != torch.float32:
                stack.enter_context(autocast_to(self.device.type,
                                                self.dtype))
            stack.enter_context(preferred_attention())
            # Had any of it failed, what was entered would be left.
            return stack.pop_all()

    def refresh_fp8_forms(self) -> None:
        """Make the kept FP8 forms of the weights that changed again,
        where forms are kept (``coom.fp8.weights``)."""
        if self.keep_fp8_forms:
            refresh_kept(self.model)

    def forward_backward(self, batches: list[Batch], loss_tokens: int,
                         mtp_weight: float) -> torch.Tensor:
        """Forward and backward of this process's micro-batches of a step
        whose losses are averaged over loss_tokens (all processes'); the
        gradients are then complete. Returns the step's language-model
        loss and MTP depths' mean, summed over every process."""
        if self.weights is not None and self.weights.keep_gradients \
                and len(batches) > 1:
            raise ValueError(
                f"{len(batches)} micro-batches for compute weights built to "
                "keep one micro-batch's bf16 gradients, which would be "
                "summed in bf16")
        device = self.device
        with self.compute():
            if self.pipeline is not None:
                sums = self.pipeline.forward_backward(
                    _stack(batches).to(device), loss_tokens, mtp_weight)
            else:
                # Sums stay on the device until the step ends: a .item()
                # per micro-batch would stall the GPU's queue.
                sums = torch.zeros(2, device=device)
                for index, batch in enumerate(batches):
                    self._reduce_gradients(index == len(batches) - 1)
                    sums += self._forward_backward(batch.to(device),
                                                   loss_tokens, mtp_weight)
        if self.sequence_parallel:
            sum_sequence_parallel_gradients(self.model, self.world)
        return self.world.all_reduce(sums)

    def _reduce_gradients(self, reduce: bool) -> None:
        """Under FSDP, whether the coming backward reduce-scatters the
        gradients: only the step's last does, the earlier ones' summed
        into FSDP's unsharded float32 gradients meanwhile; with
        keep_gathered, only it frees the gathered weights too. (The
        pipeline's schedule does the same for its stages.)"""
        if isinstance(self.model, FSDPModule):
            self.model.set_requires_gradient_sync(reduce)
            if self.keep_gathered:
                self.model.set_reshard_after_backward(reduce)

    def _forward_backward(self, batch: Batch, loss_tokens: int,
                          mtp_weight: float) -> torch.Tensor:
        losses_k = self.model(batch.tokens, labels_bs=batch.labels,
                              loss_mask_bs=batch.loss_mask,
                              loss_tokens=loss_tokens)
        objective, parts = training_objective(losses_k, mtp_weight,
                                              self.world.data_size)
        objective.backward()
        return parts

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> float:
        """The mean of the micro-batches' mean language-model losses."""
        self.model.eval()
        with self.compute():
            if self.pipeline is not None:
                mean = self.pipeline.evaluate(batches)
            else:
                device = self.device
                mean = sum(
                    self.model(batch.tokens.to(device),
                               labels_bs=batch.labels.to(device),
                               loss_mask_bs=batch.loss_mask.to(device)
                               )[0].item()
                    for batch in batches) / len(batches)
        self.model.train()
        return mean

    def _gradient_groups(self) -> list[list[torch.nn.Parameter]]:
        """The parameters holding gradients (the compute copies, where
        they keep them: ``ComputeWeights``), by the mesh their gradients
        are sharded on (None: plain tensors)."""
        holders = self.model.parameters() if self.weights is None \
            else self.weights.holders()
        groups = {}
        for parameter in holders:
            if parameter.grad is not None:
                mesh = getattr(parameter.grad, "device_mesh", None)
                groups.setdefault(mesh, []).append(parameter)
        return list(groups.values())

    def gradient_norm(self) -> torch.Tensor:
        """The gradients' norm. torch's norm takes gradients of one kind
        at a time, so plain gradients and those sharded on each mesh
        (DTensor: FSDP's, and FSDP x TP's) are summed apart, a sharded
        norm over all its shards, and those of the pipeline's other
        stages are added to them."""
        norms = [_total_norm([p.grad for p in group])
                 for group in self._gradient_groups()]
        norm = torch.stack([n.full_tensor() if isinstance(n, DTensor)
                            else n for n in norms]).norm()
        return self.world.pipeline_sum(norm.square()).sqrt()
