"""How a block's heavy parts run: the attention (``MLA``), the
feed-forwards (``SwiGLU``), the routed experts (``GroupedExperts``) and
an MoE layer's whole routed path (``MoE.routed``) each call their
computation through their ``recompute`` field, a
function ``recompute(compute, *args)``. It is ``direct`` as built;
activation recomputation (``coom.parallel.recompute``) sets it to a call
under ``torch.utils.checkpoint``.
"""


def direct(compute, *args):
    """compute(*args), keeping its activations for the backward."""
    return compute(*args)
