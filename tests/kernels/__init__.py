"""What the kernel tests share: the device they run on (a GPU when there
is one, else the CPU through Triton's interpreter) and how they compare
with a float64 reference."""
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Relative error bound of ||out - ref|| / ||ref|| by dtype (METHOD.md).
BOUND = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; out must be finite."""
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm()).item()
