"""Expert load balancing across the run's processes, once a step.

Each MoE layer counts its routed load and its weighted auxiliary losses
in every training forward (``coom.layers.moe``). After the optimizer
step, ``ExpertBalancer.after_step`` sums every layer's counts over the
data-parallel processes in one stacked all-reduce (the expert bias moves
by the load of the whole global batch), moves the expert biases of the
auxiliary-loss-free balancing, and resets the counts. The step's loads
stay on the device; ``metrics`` reads them to the host, and gathers them
over the pipeline's stages, only when the trainer logs.

Tensor names end in their shape: l MoE layers of this process; e routed
experts.
"""
from typing import Optional

import torch

from coom.layers.moe import MoE
from coom.parallel.mesh import World


class ExpertBalancer:
    """The balancing of this process's MoE layers.

    Args:
        layers: this process's MoE layers, by block index.
        world: the run's processes.
        micro_batches: the micro-batches of a step, over all processes,
            over which the auxiliary loss's metric is a mean.
    """

    def __init__(self, layers: dict[int, MoE], world: World,
                 micro_batches: int):
        self.layers = layers
        self.world = world
        self.micro_batches = micro_batches
        self.loads_le = None
        self.aux_loss = None
        """The last step's loads and summed auxiliary losses, on the
        device."""

    def after_step(self, applies: Optional[torch.Tensor] = None) -> None:
        """Move the expert biases by the step's load, unless applies (a
        bool on the device, for a step launched before the host has
        judged it: ``coom.train.trainer``) is false."""
        if not self.layers:
            return
        layers = list(self.layers.values())
        with torch.no_grad():
            counts = torch.cat([
                torch.stack([moe.tokens_per_expert for moe in layers]),
                torch.stack([moe.aux_loss_sum for moe in layers])[:, None]],
                dim=1)
            self.world.all_reduce(counts)
            self.loads_le, aux_l = counts[:, :-1], counts[:, -1]
            self.aux_loss = aux_l.sum() / self.micro_batches
            moved = [moe for moe in layers
                     if moe.config.moe_router_enable_expert_bias]
            if moved:
                rate = moved[0].config.moe_router_bias_update_rate
                loads_le = torch.stack([
                    load_e for moe, load_e in zip(layers, self.loads_le)
                    if moe.config.moe_router_enable_expert_bias])
                steps_le = rate * torch.sign(
                    loads_le.mean(dim=1, keepdim=True) - loads_le)
                if applies is not None:
                    steps_le = torch.where(applies, steps_le, 0.0)
                torch._foreach_add_([moe.router.bias for moe in moved],
                                    list(steps_le))
            self.discard()

    def discard(self) -> None:
        """Forget the step's counts: for a step that updates nothing."""
        for moe in self.layers.values():
            moe.tokens_per_expert.zero_()
            moe.aux_loss_sum.zero_()

    def _local_metrics(self) -> dict:
        """This process's layers' load statistics, in one read."""
        if self.loads_le is None:
            return {}
        loads_le = self.loads_le
        max_vio_l = loads_le.max(dim=1).values / loads_le.mean(dim=1) - 1
        dead_l = (loads_le == 0).sum(dim=1)
        rows = torch.cat([max_vio_l[:, None], dead_l[:, None],
                          loads_le], dim=1).tolist()
        metrics = {}
        for index, (max_vio, dead, *load) in zip(self.layers, rows):
            metrics[f"moe_max_vio_layer{index}"] = max_vio
            metrics[f"moe_dead_experts_layer{index}"] = int(dead)
            metrics[f"moe_load_layer{index}"] = [int(x) for x in load]
        return metrics

    def metrics(self) -> dict:
        """The last step's load statistics of every MoE layer of the run
        (gathered from every pipeline stage), their max violations' mean
        and the auxiliary loss; every process of the pipeline calls it.
        """
        gathered = self.world.pipeline_gather(
            (self._local_metrics(),
             None if self.aux_loss is None else self.aux_loss.item()))
        aux = [stage_aux for _, stage_aux in gathered
               if stage_aux is not None]
        metrics = {"aux_loss": sum(aux)} if aux else {}
        for stage, _ in gathered:
            metrics |= stage
        max_vios = [value for key, value in metrics.items()
                    if key.startswith("moe_max_vio_layer")]
        if max_vios:
            metrics["moe_max_vio"] = sum(max_vios) / len(max_vios)
        return metrics
