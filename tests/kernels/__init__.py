"""What the kernel tests share: the device they run on (a GPU when there
is one, else the CPU through Triton's interpreter) and how they compare
with a float64 reference."""
import torch

from coom.kernels import (
    adamw,
    cross_entropy,
    permute,
    rmsnorm,
    rope,
    router,
    swiglu,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Relative error bound of ||out - ref|| / ||ref|| by dtype (METHOD.md).
BOUND = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
OPS = (adamw.adamw_step, cross_entropy.linear_cross_entropy_forward,
       permute.permute, permute.unpermute, permute.unpermute_backward,
       rmsnorm.rms_norm_forward, rmsnorm.rms_norm_backward, rope.rotate,
       router.route_forward, router.route_backward, swiglu.swiglu,
       swiglu.swiglu_backward)
"""Every op with a CPU kernel."""


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 on the CPU (either may be on a
    GPU); out must be finite."""
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm()).item()


def reference_and_fused(build) -> tuple:
    """build(False) and build(True) (``fused_kernels``), on DEVICE, the
    second given the first's state."""
    reference, fused = (build(fused).to(DEVICE) for fused in (False, True))
    fused.load_state_dict(reference.state_dict())
    return reference, fused
