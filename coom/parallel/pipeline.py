"""Pipeline parallelism with ``torch.distributed.pipelining``.

The blocks are cut into ``parallel.pipeline_stages`` stages of
consecutive blocks, the earlier stages taking one more when they do not
split evenly; the first stage also holds the embedding, the last the
final norm, the output head and the MTP modules. The stages run on the
processes along the mesh's "pp" dimension: one each under 1F1B and GPipe,
several looped (process p holds stages p, p + P, ...) under the
interleaved schedules, and two in a V (process p holds stages p and
2P - 1 - p) under ZBVZeroBubble and DualPipeV, so that the first process
holds both ends of the model, as DeepSeek-V3's DualPipe does.

Each process keeps in its ``Transformer`` only what its stages hold: the
blocks of other stages leave the ``layers`` dict, whose keys are the block
indices, so the parameter names, and therefore checkpoints, are those of
the whole model, and DCP reshards between layouts. Each stage is a
``Stage`` module over its parts, which ``parallelize`` makes an FSDP root.

Between stages flow the hidden state (b, s, d) and, with MTP, the
embeddings of the tokens ahead that each MTP depth reads: the first stage
computes them, since it holds the embedding, which MTP shares with the
main model. The labels and the loss mask reach every stage as keyword
arguments. The last stage returns the micro-batch's objective, scaled
exactly as the trainer scales it without pipelining
(``coom.train.loss``), so the schedule only differentiates it
(``scale_grads=False``). The MoE auxiliary losses of the other stages
enter the backward through ``AuxLossGradient`` on their stage's output.

Tensor names end in their shape: b micro-batch; s sequence; d width.
"""
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    PipelineScheduleSingle,
    ScheduleDualPipeV,
    ScheduleZBVZeroBubble,
    get_schedule_class,
)

from coom.config import ParallelConfig
from coom.data.loader import Batch
from coom.errors import UserError
from coom.layers.moe import MoE
from coom.models.transformer import (
    Transformer,
    ahead_embeddings,
    head_features,
)
from coom.parallel.mesh import PIPELINE, World
from coom.train.loss import micro_batch_objective, token_losses


def split_layers(num_layers: int, stages: int) -> list[list[int]]:
    """The block indices of each stage: consecutive, as even as can be,
    the earlier stages taking the remainder."""
    size, extra = divmod(num_layers, stages)
    bounds = [0]
    for stage in range(stages):
        bounds.append(bounds[-1] + size + (stage < extra))
    return [list(range(bounds[s], bounds[s + 1])) for s in range(stages)]


def stages_of_process(parallel: ParallelConfig, rank: int) -> list[int]:
    """The stage indices the process at pipeline rank rank holds, in the
    order its schedule expects them."""
    size, stages = parallel.pipeline, parallel.pipeline_stages
    schedule = get_schedule_class(parallel.pipeline_schedule)
    if schedule in (ScheduleZBVZeroBubble, ScheduleDualPipeV):
        return [rank, stages - 1 - rank]
    return list(range(rank, stages, size))


class AuxLossGradient(torch.autograd.Function):
    """Passes x through; the backward also gives aux_loss a gradient of 1,
    so that the auxiliary losses of a stage that does not end in the loss
    are trained as if they were added to it."""

    @staticmethod
    def forward(ctx, x, aux_loss):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones((), device=grad.device)


class Stage(nn.Module):
    """The part of the model one pipeline stage runs.

    Its forward takes the token ids (first stage) or the previous stage's
    outputs, and the micro-batch's labels and loss mask; it returns the
    hidden state and the MTP depths' ahead embeddings, or on the last
    stage the micro-batch's objective (training) or its mean loss
    (evaluation).

    Args:
        model: the process's Transformer, holding at least this stage's
            parts.
        layers: the stage's block indices.
        first, last: whether it is the first or last stage.
        scales: the step's scales, which ``Pipeline.step`` sets and the
            stages share.
    """

    def __init__(self, model: Transformer, layers: list[int], first: bool,
                 last: bool, scales: dict):
        super().__init__()
        self.rope = model.rope
        self.depths = model.config.mtp_num_layers
        self.first, self.last = first, last
        self.embed = model.embed if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[str(i)]
                                     for i in layers})
        self.norm = model.norm if last else None
        self.head = model.head if last else None
        self.mtp = model.mtp if last else None
        self.scales = scales
        self.sums = None
        """Of the step so far (``Pipeline.step`` starts them): the
        language-model loss, the MTP depths' mean and the auxiliary
        losses."""

    def _aux_loss(self) -> torch.Tensor:
        blocks = list(self.layers.values())
        if self.last:
            blocks += [module.block for module in self.mtp]
        losses = [block.mlp.aux_loss for block in blocks
                  if isinstance(block.mlp, MoE)]
        return sum(losses) / self.scales["micro_batches"] if losses \
            else torch.zeros(())

    def forward(self, *inputs, labels_bs: torch.Tensor,
                mask_bs: torch.Tensor):
        if self.first:
            h_bsd = self.embed(inputs[0])
            aheads = ahead_embeddings(self.embed, labels_bs, self.depths)
        else:
            h_bsd, *aheads = inputs
        for block in self.layers.values():
            h_bsd = block(h_bsd, self.rope, None)
        if not self.training:
            if not self.last:
                return h_bsd, *aheads
            features = [self.norm(h_bsd)]
            return token_losses(features, self.head.weight, labels_bs,
                                mask_bs, labels_bs.numel())[0].view(1)
        if self.last:
            return self._objective(h_bsd, aheads, labels_bs, mask_bs)
        aux = self._aux_loss().to(h_bsd.device)
        self.sums[2] += aux.detach()
        h_bsd = AuxLossGradient.apply(
            h_bsd, aux * self.scales["data_size"])
        # Passed on as copies: a stage's output must not be its input.
        return h_bsd, *(ahead.clone() for ahead in aheads)

    def _objective(self, h_bsd, aheads, labels_bs, mask_bs) -> torch.Tensor:
        features = head_features(h_bsd, aheads, self.norm, self.mtp,
                                 self.rope)
        objective, parts = micro_batch_objective(
            token_losses(features, self.head.weight, labels_bs, mask_bs,
                         self.scales["tokens"]),
            self._aux_loss(), self.scales["mtp_weight"],
            self.scales["data_size"])
        self.sums += parts
        return objective.view(1)


def _identity_loss(output: torch.Tensor, target) -> torch.Tensor:
    """The last stage returns its objective already, of shape (1,) so
    that the schedule can stack the micro-batches' outputs."""
    return output.sum()


class Pipeline:
    """This process's stages of the run's pipeline and their schedule.

    Building it keeps in model only this process's parts; ``stages`` are
    then made FSDP roots (``parallelize``) before ``schedule`` is built.

    Args:
        model: the whole model, materialised.
        world: the run's processes.
        parallel: the parallel config.
        micro_batches: micro-batches each data-parallel process takes
            per step.
        micro_batch_shape: (sequences, tokens) of each.
    """

    def __init__(self, model: Transformer, world: World,
                 parallel: ParallelConfig, micro_batches: int,
                 micro_batch_shape: tuple[int, int]):
        self.world = world
        self.parallel = parallel
        self.micro_batches = micro_batches
        self.shape = micro_batch_shape
        self.width = model.config.hidden_size
        self.depths = model.config.mtp_num_layers
        count = parallel.pipeline_stages
        layers = split_layers(model.config.num_layers, count)
        self.indices = stages_of_process(parallel, world.pipeline_rank)
        self.scales = {}
        self.stages = [Stage(model, layers[i], i == 0, i == count - 1,
                             self.scales) for i in self.indices]
        kept = {str(i) for index in self.indices for i in layers[index]}
        model.layers = nn.ModuleDict({key: block for key, block
                                      in model.layers.items()
                                      if key in kept})
        if not self.has_first:
            model.embed = None
        if not self.has_last:
            model.norm = model.head = None
            model.mtp = nn.ModuleList()
        self.schedule = None

    @property
    def has_first(self) -> bool:
        return 0 in self.indices

    @property
    def has_last(self) -> bool:
        return self.parallel.pipeline_stages - 1 in self.indices

    def _examples(self, index: int) -> tuple[tuple, tuple]:
        """What stage index takes and returns, as meta tensors: given
        them, the stages skip torch's shape inference, which would run
        each stage once more, on made-up activations, and count the
        routed load of that run."""
        batch, length = self.shape
        hidden = tuple(
            torch.empty(batch, length - depth, self.width, device="meta",
                        requires_grad=True)
            for depth in range(self.depths + 1))
        inputs = hidden if index else (
            torch.empty(batch, length, dtype=torch.long, device="meta"),)
        last = index == self.parallel.pipeline_stages - 1
        outputs = (torch.empty(1, device="meta", requires_grad=True),) \
            if last else hidden
        return inputs, outputs

    def build_schedule(self) -> None:
        """The schedule over the stages, once they are FSDP roots."""
        group = self.world.mesh[PIPELINE].get_group()
        count = self.parallel.pipeline_stages
        stages = []
        for index, stage in zip(self.indices, self.stages):
            inputs, outputs = self._examples(index)
            stages.append(PipelineStage(
                stage, index, count, self.world.device, input_args=inputs,
                output_args=outputs, group=group))
        schedule = get_schedule_class(self.parallel.pipeline_schedule)
        if issubclass(schedule, PipelineScheduleSingle):
            (stages,) = stages
        try:
            self.schedule = schedule(stages, self.micro_batches,
                                     loss_fn=_identity_loss,
                                     scale_grads=False)
        except ValueError as error:  # torch's checks of the micro-batches
            raise UserError(
                f"config field parallel.pipeline_schedule: {error} (each "
                f"data-parallel process runs {self.micro_batches} "
                "micro-batches a step: train.global_batch_size / "
                "train.micro_batch_size / data-parallel processes)"
            ) from None

    def _run(self, batch: Batch) -> None:
        args = (batch.tokens,) if self.has_first else ()
        target = batch.labels if self.has_last else None
        self.schedule.step(*args, target=target, labels_bs=batch.labels,
                           mask_bs=batch.loss_mask)

    def step(self, batch: Batch, tokens: int, micro_batches: int,
             data_size: int, mtp_weight: float) -> torch.Tensor:
        """Forward and backward of this process's share of a global batch
        (its micro-batches stacked); returns the step's sums of the
        language-model loss, the MTP mean and the auxiliary losses, whole
        on every stage."""
        self.scales |= {"tokens": tokens, "micro_batches": micro_batches,
                        "data_size": data_size, "mtp_weight": mtp_weight}
        for stage in self.stages:
            stage.sums = torch.zeros(3, device=self.world.device)
        self._run(batch)
        sums = sum(stage.sums for stage in self.stages)
        return self.world.pipeline_sum(sums)

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> float:
        """The mean of the micro-batches' mean losses. Each goes through
        the stages one after the other, without a schedule (whose
        forward-only run fails under torch's V-shaped schedules)."""
        group = self.world.mesh[PIPELINE].get_group()
        count = self.parallel.pipeline_stages
        owner = {index: dist.get_global_rank(group, rank)
                 for rank in range(self.parallel.pipeline)
                 for index in stages_of_process(self.parallel, rank)}
        here = dist.get_rank()
        mine = dict(zip(self.indices, self.stages))
        for stage in self.stages:
            stage.eval()
        total = torch.zeros((), device=self.world.device)
        for batch in batches:
            batch = batch.to(self.world.device)
            carried = (batch.tokens,)
            for index in sorted(mine):
                if index and owner[index - 1] != here:
                    carried = tuple(
                        torch.empty_like(example, device=self.world.device)
                        for example in self._examples(index)[0])
                    for tensor in carried:
                        dist.recv(tensor, owner[index - 1], group)
                carried = mine[index](*carried, labels_bs=batch.labels,
                                      mask_bs=batch.loss_mask)
                if index == count - 1:
                    total += carried.sum()
                elif owner[index + 1] != here:
                    for tensor in carried:
                        dist.send(tensor.contiguous(), owner[index + 1],
                                  group)
        for stage in self.stages:
            stage.train()
        return self.world.pipeline_sum(total).item() / len(batches)
