"""Triton router top-k against a float64 reference (interpreted on CPU)."""
import pytest
import torch

from coom.kernels.router import route, route_forward, route_reference
from tests.kernels import DEVICE, relative_error


def _by_expert(weights_tk, experts_tk):
    """Weights and ids sorted by expert id: ties in float32 may order
    equal scores differently."""
    experts_tk, order_tk = experts_tk.sort(dim=-1)
    return weights_tk.gather(1, order_tk), experts_tk


SHAPES = [(5, 64, 6, 1, 1), (123, 8, 2, 4, 2), (123, 24, 3, 4, 2),
          (123, 64, 6, 4, 2), (1000, 8, 2, 1, 1)]
CASES = [(*shape, "noaux_tc", scoring_func, norm_topk_prob)
         for shape in SHAPES for scoring_func in ("sigmoid", "softmax")
         for norm_topk_prob in (True, False)]
# DeepSeek-V2's groups, ranked by their best expert, one expert each in
# the last shape.
V2_SHAPES = [(123, 8, 2, 4, 2), (123, 64, 6, 8, 3), (123, 8, 3, 8, 3)]
CASES += [(*shape, "group_limited_greedy", scoring_func, False)
          for shape in V2_SHAPES for scoring_func in ("sigmoid", "softmax")]


@pytest.mark.parametrize(
    "tokens, experts, k, n_group, topk_group, topk_method, scoring_func, "
    "norm_topk_prob",
    CASES + [(1000, 64, 6, 4, 2, "noaux_tc", "sigmoid", True)])
def test_route_forward_and_backward(tokens, experts, k, n_group, topk_group,
                                    topk_method, scoring_func,
                                    norm_topk_prob):
    torch.manual_seed(tokens * experts + k)
    logits = torch.randn(tokens, experts, device=DEVICE) * 2
    logits.requires_grad_()
    bias = torch.randn(experts, device=DEVICE) / experts
    fields = (k, scoring_func, n_group, topk_group, topk_method,
              norm_topk_prob, 2.5)
    scores, weights, chosen = route(logits, bias, *fields)
    assert scores.dtype == weights.dtype == torch.float32
    assert chosen.dtype == torch.int64 and chosen.shape == (tokens, k)
    # The weights' gradient depends on the expert, not on the slot.
    dscores, dweights_te = torch.randn(2, tokens, experts, device=DEVICE)
    torch.autograd.backward([scores, weights],
                            [dscores, dweights_te.gather(1, chosen)])

    logits64 = logits.detach().double().requires_grad_()
    ref_scores, ref_weights, ref_chosen = route_reference(
        logits64, bias.double(), *fields)
    torch.autograd.backward(
        [ref_scores, ref_weights],
        [dscores.double(), dweights_te.double().gather(1, ref_chosen)])
    weights, chosen = _by_expert(weights, chosen)
    ref_weights, ref_chosen = _by_expert(ref_weights, ref_chosen)
    assert torch.equal(chosen, ref_chosen)
    assert relative_error(scores, ref_scores) < 1e-5
    assert relative_error(weights, ref_weights) < 1e-5
    assert relative_error(logits.grad, logits64.grad) < 1e-5


def test_route_picks_the_best_first_and_the_lowest_index_on_ties():
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 1.0, -1.0]], device=DEVICE)
    bias = torch.zeros(6, device=DEVICE)
    _, weights, chosen = route(logits, bias, 3, "sigmoid", 1, 1, "noaux_tc",
                               False, 1.0)
    assert chosen.tolist() == [[1, 3, 2]]
    torch.testing.assert_close(weights, logits.sigmoid()[:, [1, 3, 2]])


def test_route_gradient_through_one_output_and_empty_input():
    logits = torch.randn(7, 8, device=DEVICE, requires_grad=True)
    bias = torch.zeros(8, device=DEVICE)
    fields = (2, "softmax", 1, 1, "noaux_tc", False, 1.0)
    route(logits, bias, *fields)[1].sum().backward()
    logits64 = logits.detach().double().requires_grad_()
    route_reference(logits64, bias.double(), *fields)[1].sum().backward()
    assert relative_error(logits.grad, logits64.grad) < 1e-5
    scores, weights, chosen = route(logits[:0], bias, *fields)
    assert scores.shape == (0, 8) and weights.shape == chosen.shape == (0, 2)


def test_route_op_registration():
    """Schema, fake implementation and autograd as torch.compile sees
    them."""
    logits = torch.randn(9, 8, device=DEVICE, requires_grad=True)
    bias = torch.randn(8, device=DEVICE) / 8
    torch.library.opcheck(route_forward,
                          (logits, bias, 3, False, 4, 2, True, 2.5, False))
