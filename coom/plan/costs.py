"""What each operator of a dry run costs: its FLOPs and the bytes it
moves, by kind, for the step-time roofline (``coom.plan.step_time``).

``OpCosts`` sees every operator of a forward and backward on the meta
device (a ``TorchDispatchMode``, under ``coom.plan.dry_run``'s). Matrix
products, grouped products and attention count their FLOPs with
``torch.utils.flop_counter``'s formulas (the grouped product, which it
lacks, and COOM's fused loss and FP8 products, here); every other
operator that makes a tensor counts the bytes it reads and writes. Views
and other aliasing results move nothing.
"""
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

aten = torch.ops.aten
KINDS = {
    "matmul": (aten.mm, aten.addmm, aten.bmm, aten.baddbmm),
    "fp8 matmul": (aten._scaled_mm,),
    "grouped matmul": (aten._grouped_mm,),
    "fp8 grouped matmul": (aten._scaled_grouped_mm,),
    "attention": (aten._scaled_dot_product_cudnn_attention,
                  aten._scaled_dot_product_cudnn_attention_backward,
                  aten._scaled_dot_product_flash_attention,
                  aten._scaled_dot_product_flash_attention_backward),
}
KIND_OF = {op: kind for kind, ops in KINDS.items() for op in ops}


def _argument(func, args: tuple, kwargs: dict, name: str):
    """The value of func's argument name in a call."""
    for index, argument in enumerate(func._schema.arguments):
        if argument.name == name:
            if name in kwargs:
                return kwargs[name]
            return args[index] if index < len(args) \
                else argument.default_value


def _loss_flops(func, args: tuple, kwargs: dict) -> int:
    """The fused linear cross-entropy's products: the logits, and with
    its gradients (which it makes in the forward) the two products of
    their backward."""
    tokens, width = args[0].shape
    vocab = args[1].shape[0]
    gradients = _argument(func, args, kwargs, "gradients")
    return (6 if gradients else 2) * tokens * vocab * width


def _fp8_product_flops(func, args: tuple, kwargs: dict) -> int:
    """a (m, k) by b (k, n)."""
    return 2 * args[0].shape[0] * args[0].shape[1] * args[1].shape[1]


def _fp8_grouped_flops(func, args: tuple, kwargs: dict) -> int:
    """Rows a (t, k) by experts b (e, n, k)."""
    return 2 * args[0].shape[0] * args[0].shape[1] * args[2].shape[1]


def _fp8_weight_gradient_flops(func, args: tuple, kwargs: dict) -> int:
    """a (n, c) by b (k, c), c the tokens of all experts."""
    return 2 * args[0].shape[0] * args[0].shape[1] * args[2].shape[0]


def _coom_products() -> dict:
    """COOM's own ops that run matrix products inside, by overload
    packet: (kind, FLOPs of a call)."""
    coom = torch.ops.coom
    return {
        coom.linear_cross_entropy: ("matmul", _loss_flops),
        coom.fp8_scaled_mm: ("fp8 matmul", _fp8_product_flops),
        coom.fp8_grouped_mm: ("fp8 grouped matmul", _fp8_grouped_flops),
        coom.fp8_grouped_mm_wgrad: ("fp8 grouped matmul",
                                    _fp8_weight_gradient_flops),
    }


def _grouped_flops(a: torch.Tensor, b: torch.Tensor) -> int:
    """2 m k n of a grouped product: the forward's and the input
    gradient's rows a (m, k) by experts b (e, k, n), or the weight
    gradient's a (k, m) by b (m, n): each row meets one expert's k x n."""
    return 2 * a.shape[0] * a.shape[1] * b.shape[-1]


@dataclass(frozen=True)
class OpCost:
    """One operator call: its kind, FLOPs and bytes read and written."""

    kind: str
    flops: int
    bytes: int


class OpCosts(TorchDispatchMode):
    """The cost of every operator call made under it (``ops``)."""

    def __init__(self):
        super().__init__()
        self.ops: list[OpCost] = []
        self.products = _coom_products()

    def _add(self, kind: str, flops: int, moved: int) -> None:
        self.ops.append(OpCost(kind, flops, moved))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Views move nothing; in-place operators (which return an alias
        # they write) read their inputs and write their first.
        if any(ret.alias_info is not None and not ret.alias_info.is_write
               for ret in func._schema.returns):
            return out
        tensors = [t for t in tree_leaves((args, kwargs, out))
                   if isinstance(t, torch.Tensor)]
        moved = sum(t.nbytes for t in tensors)
        packet = func.overloadpacket
        kind = KIND_OF.get(packet)
        if packet in self.products:
            kind, flops = self.products[packet]
            self._add(kind, flops(func, args, kwargs), moved)
        elif kind is None:
            self._add("memory", 0, moved)
        elif "grouped" in kind:
            self._add(kind, _grouped_flops(args[0], args[1]), moved)
        else:
            flops = flop_registry[packet](*args, **kwargs, out_val=out)
            if kind == "attention" and _argument(func, args, kwargs,
                                                 "is_causal"):
                flops //= 2  # the kernels skip the masked half
            self._add(kind, flops, moved)
        return out
