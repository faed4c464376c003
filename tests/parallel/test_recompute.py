"""Activation recomputation: the same losses, gradients and MoE loads as
without it; the blocks' activations left to checkpoint; which ops run
again. (Peak memory on a GPU: docs/benchmarks.md.)"""
import copy
from contextlib import contextmanager

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from coom.config import load_config
from coom.models import Transformer
from coom.parallel.recompute import recompute_blocks

# The tiny recipe's model (MLA, a dense block, MoE blocks with shared
# experts, one MTP depth) at 2 blocks and a small vocabulary.
MODEL = load_config("tiny", ["model.vocab_size=256",
                             "model.num_layers=2"]).model


@contextmanager
def _counting_saved_bytes(counter: list):
    """Adds the bytes of every tensor autograd keeps for the backward."""
    def pack(tensor):
        counter[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def _train_step(model: Transformer, tokens_bs: torch.Tensor):
    """Losses, gradients, routed loads and the bytes kept for the
    backward of one forward and backward."""
    saved = [0]
    with _counting_saved_bytes(saved):
        losses = model(tokens_bs, labels_bs=tokens_bs)
    # The MoE layers' auxiliary losses join the backward themselves.
    losses.sum().backward()
    gradients = {name: parameter.grad
                 for name, parameter in model.named_parameters()}
    loads = [moe.tokens_per_expert.clone()
             for moe in model.moe_layers().values()]
    return losses, gradients, loads, saved[0]


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = Transformer(MODEL)
    model.init_weights()
    tokens_bs = torch.randint(0, MODEL.vocab_size, (2, 32))
    return model, tokens_bs, _train_step(copy.deepcopy(model), tokens_bs)


@pytest.mark.parametrize("granularity", ["selective", "full"])
def test_same_results_fewer_saved_tensors(reference, granularity):
    model, tokens_bs, (losses, gradients, loads, saved) = reference
    model = copy.deepcopy(model)
    recompute_blocks(model, granularity)
    ours, our_gradients, our_loads, our_saved = _train_step(model,
                                                            tokens_bs)
    assert [loss.item() for loss in ours] == \
        [loss.item() for loss in losses]
    for name, gradient in gradients.items():
        assert torch.equal(our_gradients[name], gradient), name
    # Recomputed forwards do not count their tokens again.
    for our_load, load in zip(our_loads, loads):
        assert torch.equal(our_load, load)
    # Inside the blocks checkpoint keeps what it needs itself, so what
    # autograd saves is only the rest of the model's.
    print(f"\n{granularity}: autograd saves {our_saved / 2**20:.2f} MiB "
          f"outside checkpoint, against {saved / 2**20:.2f} MiB without")
    assert our_saved < saved


def test_full_keeps_no_copy_of_the_routed_tokens(reference):
    """Under full recomputation an MoE layer keeps its tokens for the
    router's backward, and the routing: not the copies sent to its
    experts nor the experts' outputs that the combine weighs, which
    would take twice the routed copies' bytes."""
    model = copy.deepcopy(reference[0])
    recompute_blocks(model, "full")
    moe = next(iter(model.moe_layers().values()))
    tokens, config = 64, model.config
    x_bsd = torch.randn(1, tokens, config.hidden_size, requires_grad=True)
    saved = [0]
    with _counting_saved_bytes(saved):
        moe(x_bsd)
    one_copy = x_bsd.numel() * x_bsd.element_size()
    routed_copies = one_copy * config.num_experts_per_tok
    print(f"\nfull: the MoE layer keeps {saved[0]} bytes; its tokens "
          f"take {one_copy}, their routed copies {routed_copies}")
    assert saved[0] < one_copy + routed_copies


class _OpCounter(TorchDispatchMode):
    """Counts the matrix products and the other ops that run."""

    def __init__(self):
        super().__init__()
        self.products = self.others = 0

    def __torch_dispatch__(self, op, types, args=(), kwargs=None):
        if op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
                  torch.ops.aten.bmm.default):
            self.products += 1
        else:
            self.others += 1
        return op(*args, **(kwargs or {}))


def _count_ops(model: Transformer, granularity: str, tokens_bs):
    model = copy.deepcopy(model)
    recompute_blocks(model, granularity)
    with _OpCounter() as counter:
        _train_step(model, tokens_bs)
    return counter.products, counter.others


def test_selective_recomputes_all_but_the_products(reference):
    """Full recomputation runs the blocks' matrix products again in the
    backward; selective keeps them and reruns only the rest."""
    model, tokens_bs, _ = reference
    none, selective, full = (_count_ops(model, granularity, tokens_bs)
                             for granularity in ("none", "selective",
                                                 "full"))
    print(f"\nproducts, other ops: none {none}, selective {selective}, "
          f"full {full}")
    assert selective[0] == none[0] < full[0]
    assert none[1] < selective[1]


def test_unknown_granularity_is_refused(reference):
    with pytest.raises(ValueError, match="selective"):
        recompute_blocks(reference[0], "some")


def test_parameter_names_and_module_types_are_unchanged(reference):
    """No wrapper module, and every module runs its class's forward."""
    model = copy.deepcopy(reference[0])
    before = {name: type(module) for name, module in model.named_modules()}
    recompute_blocks(model, "full")
    assert {name: type(module)
            for name, module in model.named_modules()} == before
    assert not any("forward" in vars(module) for module in model.modules())
