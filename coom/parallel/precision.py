"""Mixed precision as large-scale trainers do it: float32 master weights,
bf16 compute weights made once per optimizer step, gradients summed in
float32.

The model's parameters are the float32 master weights: the optimizer
steps them in float32, checkpoints save them, and every layout's state
is theirs. In bf16 precision (``train.precision``; the default on GPUs)
forwards and backwards compute with bf16 copies of every parameter,
made from the masters once per optimizer step, and each micro-batch's
bf16 gradients are summed into the masters' float32 gradients, so a
step's gradient is accumulated in float32. A step of one micro-batch has
nothing to sum: its bf16 gradients stay where autograd put them, on the
copies, and the norm and the optimizer read them there, as float32 (the
same values: each bf16 is a float32), saving a cast and half the bytes
those reads move. The router and the norms
compute in float32 from their bf16 copies, as DeepSeek-V3's keep their
arithmetic: the router's products and scores and the norms' statistics
(``coom.layers``); the router's balancing bias is a buffer and stays
float32. Autocast stays on for any activation still in float32.

Two mechanisms carry the same rule:

- under FSDP (``coom.parallel.parallelize``), FSDP2's own
  ``MixedPrecisionPolicy`` (``mixed_precision``): each unit all-gathers
  its bf16 copies, made from its float32 shards, and reduce-scatters
  float32 gradients, accumulated in float32 between micro-batches;
- otherwise ``ComputeWeights``, which swaps the copies into the model's
  modules for the forwards and backwards of a step and the masters back
  after.
"""
import contextlib
from typing import Iterator, Optional

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype forwards compute in: train.precision, where 'auto' is
    bf16 on GPUs and float32 on CPUs."""
    if precision == "bf16" or (precision == "auto"
                               and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def mixed_precision(dtype: torch.dtype) -> MixedPrecisionPolicy:
    """FSDP2's policy for compute dtype: units gather their parameters in
    dtype and reduce gradients in float32. Blocks' inputs keep their
    dtypes: the rotary tables stay float32, as without FSDP."""
    if dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype,
                                reduce_dtype=torch.float32,
                                cast_forward_inputs=False)


def weights_copied(dtype: torch.dtype, sharded: bool) -> bool:
    """Whether ``ComputeWeights`` makes the compute weights: in a
    precision below float32, outside FSDP (whose policy makes them)."""
    return dtype != torch.float32 and not sharded


def gradients_kept(pipelined: bool, micro_batches: int) -> bool:
    """Whether ``ComputeWeights`` keeps a step's gradients on its copies:
    a step of one micro-batch (on each process) has none to sum, unless
    a pipeline runs it, whose schedules may set gradients on the
    masters."""
    return not pipelined and micro_batches == 1


class ComputeWeights:
    """bf16 copies of a model's float32 parameters that its forwards and
    backwards compute with, outside FSDP.

    ``swapped_in()`` refreshes the copies of masters changed since the
    copies were last made (one fused cast; a master's version counter
    says whether anything wrote it) and puts them in the modules' place;
    leaving it puts the masters back. An optimizer step that writes the
    copies itself (``coom.train.optimizer.FusedAdamW``) says so with
    ``made_fresh``. The copies are allocated once. Each copy's gradient,
    as soon as autograd has accumulated it, is added in float32 to its
    master's and dropped; a gradient that bypassed that hook (the
    pipeline's zero-bubble schedules set weight gradients directly) is
    added on leaving. With keep_gradients (a step of one micro-batch)
    the copies keep their gradients instead (``holders``).

    Args:
        model: the model (or this process's part of it) whose parameters
            are the masters.
        dtype: the copies' dtype.
        keep_gradients: whether the gradients stay on the copies.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype,
                 keep_gradients: bool = False):
        self.keep_gradients = keep_gradients
        self.slots = [(module, name)
                      for module in model.modules()
                      for name, parameter in module.named_parameters(
                          recurse=False)]
        self.masters: dict[nn.Parameter, nn.Parameter] = {}
        for module, name in self.slots:
            master = getattr(module, name)
            if master not in self.masters:
                self.masters[master] = self._copy_of(master, dtype)
        self.copies = {copy: master for master, copy in self.masters.items()}
        self.versions: dict[nn.Parameter, int] = {}

    def _copy_of(self, master: nn.Parameter,
                 dtype: torch.dtype) -> nn.Parameter:
        copy = nn.Parameter(torch.empty_like(master, dtype=dtype),
                            requires_grad=master.requires_grad)
        if copy.requires_grad and not self.keep_gradients:
            copy.register_post_accumulate_grad_hook(self._accumulate)
        return copy

    def _accumulate(self, copy: nn.Parameter) -> None:
        master = self.copies[copy]
        if master.grad is None:
            master.grad = copy.grad.to(master.dtype)
        else:
            master.grad.add_(copy.grad)
        copy.grad = None

    def holders(self) -> list[nn.Parameter]:
        """The parameters whose .grad holds the step's gradients: the
        copies (bf16) with keep_gradients, else the masters."""
        return list(self.copies if self.keep_gradients else self.masters)

    def gradient(self, master: nn.Parameter) -> Optional[torch.Tensor]:
        """master's gradient this step, wherever it is held: its copy's
        with keep_gradients, else (or where the copy holds none, as when
        torch.distributed.checkpoint gives the masters zero gradients to
        make the optimizer's state) its own."""
        if self.keep_gradients:
            kept = self.masters[master].grad
            if kept is not None:
                return kept
        return master.grad

    def clear_gradients(self) -> None:
        """Drop the gradients the copies keep."""
        for copy in self.copies:
            copy.grad = None

    def _swap(self, table: dict) -> None:
        for module, name in self.slots:
            module._parameters[name] = table[module._parameters[name]]

    def made_fresh(self, masters: Optional[list] = None) -> None:
        """The copies of masters (by default all) now hold them as they
        are."""
        for master in self.masters if masters is None else masters:
            self.versions[master] = master._version

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The copies, fresh from the masters, in the modules' place."""
        stale = [master for master in self.masters
                 if master._version != self.versions.get(master)]
        if stale:
            with torch.no_grad():
                torch._foreach_copy_([self.masters[m] for m in stale],
                                     stale)
            self.made_fresh()
        self._swap(self.masters)
        try:
            yield
        finally:
            self._swap(self.copies)
            if not self.keep_gradients:
                for copy in self.copies:
                    if copy.grad is not None:
                        self._accumulate(copy)
