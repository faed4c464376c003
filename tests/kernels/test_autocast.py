"""The autocast helpers answer on every device, meta included, and
torch.compile traces them whole: a graph break there would split every
MoE layer's compiled graph in two. (The H100's torch could not trace
``torch.amp.is_autocast_available``, which they called before: 14 graph
breaks a step, and the router's frame recompiled past dynamo's limit.)"""
import torch

from coom.kernels.autocast import autocast_off, autocast_to, product_dtype


def _float32_product(x, w):
    """x @ w.T in float32 whatever autocast says, and the dtype autocast
    would have given it."""
    with autocast_off(x.device.type):
        y = torch.nn.functional.linear(x.float(), w.float())
    return y, product_dtype(x)


def test_helpers_trace_without_graph_breaks():
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    compiled = torch.compile(_float32_product, fullgraph=True,
                             backend="eager")
    with autocast_to("cpu", torch.bfloat16):
        y, dtype = compiled(x, w)
    assert y.dtype == torch.float32 and dtype == torch.bfloat16
    torch.testing.assert_close(y, x @ w.T, rtol=0, atol=0)


def test_meta_has_no_autocast_and_keeps_its_dtype():
    x = torch.empty(4, 8, device="meta", dtype=torch.bfloat16)
    with autocast_to("meta", torch.float16):
        y, dtype = _float32_product(x, torch.empty(3, 8, device="meta"))
    assert dtype == torch.bfloat16 and y.dtype == torch.float32
