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

Each stage is the model's ``part`` of its blocks (with the embedding on
the first, the final norm, head and MTP depths on the last), running the
model's own forward; the process's ``Transformer`` keeps only what its
stages hold: the blocks of other stages leave the ``layers`` dict, whose
keys are the block indices, so the parameter names, and therefore
checkpoints, are those of the whole model, and DCP reshards between
layouts. ``parallelize`` makes each stage an FSDP root.

Between stages flow the hidden state (b, s, d) and, with MTP, the
embeddings of the tokens ahead that each MTP depth reads: the first stage
computes them, since it holds the embedding, which MTP shares with the
main model. The labels, the loss mask and the step's token count reach
every stage as keyword arguments. The last stage returns its losses,
whose objective the schedule's loss function takes, scaled exactly as
without pipelining (``coom.parallel.model``), so the schedule only
differentiates it (``scale_grads=False``). The MoE layers of every stage
attach their auxiliary losses' gradient themselves.

Tensor names end in their shape: b micro-batch; s sequence; d width.
"""
import torch
import torch.distributed as dist
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
from coom.models.transformer import Transformer
from coom.parallel.mesh import PIPELINE, World
from coom.parallel.objective import training_objective


def split_layers(num_layers: int, stages: int) -> list[list[int]]:
    """The block indices of each stage: consecutive, as even as can be,
    the earlier stages taking the remainder."""
    size, extra = divmod(num_layers, stages)
    bounds = [0]
    for stage in range(stages):
        bounds.append(bounds[-1] + size + (stage < extra))
    return [list(range(bounds[s], bounds[s + 1])) for s in range(stages)]


def check_micro_batches(parallel: ParallelConfig, micro_batches: int
                        ) -> None:
    """Refuses, before any work, a pipeline whose schedule cannot run
    micro_batches a step on each data-parallel process, as torch's
    schedules would once built: 1F1B and DualPipeV need one micro-batch
    per stage at least; Interleaved1F1B and InterleavedZeroBubble a
    multiple of their rounds (micro-batches // parallel.pipeline, at
    least 1)."""
    if parallel.pipeline == 1:
        return
    schedule, stages = parallel.pipeline_schedule, parallel.pipeline_stages
    rounds = max(1, micro_batches // parallel.pipeline)
    if schedule in ("1F1B", "DualPipeV") and micro_batches < stages:
        needed = f"at least {stages}, one per stage"
    elif schedule in ("Interleaved1F1B", "InterleavedZeroBubble") \
            and micro_batches % rounds:
        needed = (f"a multiple of its {rounds} rounds (micro-batches // "
                  "parallel.pipeline)")
    else:
        return
    raise UserError(
        "config field parallel.pipeline_schedule: each data-parallel "
        f"process runs {micro_batches} micro-batches a step "
        "(train.global_batch_size / train.micro_batch_size / data-parallel "
        f"processes), and {schedule} over {stages} stages needs {needed}")


def stages_of_process(parallel: ParallelConfig, rank: int) -> list[int]:
    """The stage indices the process at pipeline rank rank holds, in the
    order its schedule expects them."""
    size, stages = parallel.pipeline, parallel.pipeline_stages
    schedule = get_schedule_class(parallel.pipeline_schedule)
    if schedule in (ScheduleZBVZeroBubble, ScheduleDualPipeV):
        return [rank, stages - 1 - rank]
    return list(range(rank, stages, size))


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
        dtype: the hidden state's between stages, the compute dtype
            (``coom.parallel.precision``).
    """

    def __init__(self, model: Transformer, world: World,
                 parallel: ParallelConfig, micro_batches: int,
                 micro_batch_shape: tuple[int, int], dtype: torch.dtype):
        self.world = world
        self.parallel = parallel
        self.micro_batches = micro_batches
        self.shape = micro_batch_shape
        self.dtype = dtype
        self.width = model.config.hidden_size
        self.depths = model.config.mtp_num_layers
        count = parallel.pipeline_stages
        layers = split_layers(model.config.num_layers, count)
        self.indices = stages_of_process(parallel, world.pipeline_rank)
        self.stages = [model.part(layers[i], i == 0, i == count - 1)
                       for i in self.indices]
        model.keep_only(self.stages)
        self.schedule = None
        self.mtp_weight = 0.0
        self.sums = None
        """Of the step so far: the language-model loss and the MTP
        depths' mean (``training_objective``)."""

    @property
    def has_first(self) -> bool:
        return 0 in self.indices

    @property
    def has_last(self) -> bool:
        return self.parallel.pipeline_stages - 1 in self.indices

    def _examples(self, index: int) -> tuple[tuple, tuple]:
        """What stage index takes and returns in training, as meta
        tensors: given them, the stages skip torch's shape inference,
        which would run each stage once more, on made-up activations, and
        count the routed load of that run."""
        batch, length = self.shape
        hidden = tuple(
            torch.empty(batch, length - depth, self.width, device="meta",
                        dtype=self.dtype, requires_grad=True)
            for depth in range(self.depths + 1))
        inputs = hidden if index else (
            torch.empty(batch, length, dtype=torch.long, device="meta"),)
        last = index == self.parallel.pipeline_stages - 1
        outputs = (torch.empty(self.depths + 1, device="meta",
                               requires_grad=True),) if last else hidden
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
                                     loss_fn=self._objective,
                                     scale_grads=False)
        except ValueError as error:
            # check_micro_batches refused what torch 2.13 refuses;
            # another version's checks still stop the run in a line.
            raise UserError(
                f"config field parallel.pipeline_schedule: {error} (each "
                f"data-parallel process runs {self.micro_batches} "
                "micro-batches a step: train.global_batch_size / "
                "train.micro_batch_size / data-parallel processes)"
            ) from None

    def _objective(self, losses_k: torch.Tensor, target) -> torch.Tensor:
        """The last stage's losses to what the schedule differentiates."""
        objective, parts = training_objective(losses_k, self.mtp_weight,
                                              self.world.data_size)
        self.sums += parts
        return objective

    def forward_backward(self, batch: Batch, loss_tokens: int,
                         mtp_weight: float) -> torch.Tensor:
        """Forward and backward of this process's share of a global batch
        (its micro-batches stacked), whose losses are averaged over
        loss_tokens; returns the step's sums of the language-model loss
        and the MTP mean, whole on every stage."""
        self.mtp_weight = mtp_weight
        self.sums = torch.zeros(2, device=self.world.device)
        args = (batch.tokens,) if self.has_first else ()
        target = batch.labels if self.has_last else None
        self.schedule.step(*args, target=target, labels_bs=batch.labels,
                           loss_mask_bs=batch.loss_mask,
                           loss_tokens=loss_tokens)
        return self.world.pipeline_sum(self.sums)

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
                                      loss_mask_bs=batch.loss_mask)
                if index == count - 1:
                    total += carried.sum()
                elif owner[index + 1] != here:
                    for tensor in carried:
                        dist.send(tensor.contiguous(), owner[index + 1],
                                  group)
        for stage in self.stages:
            stage.train()
        return self.world.pipeline_sum(total).item() / len(batches)
