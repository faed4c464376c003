"""The kernel tests run each op's Triton kernel: on a GPU as it is, on
the CPU through Triton's interpreter, its CPU kernel (the reference)
disabled. Tests marked ``cpu_kernels`` keep the CPU kernels."""
import contextlib

import pytest

from tests.kernels import DEVICE, OPS


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cpu_kernels: run the ops' CPU kernels, not Triton")


@pytest.fixture(autouse=True)
def triton_on_cpu(request):
    with contextlib.ExitStack() as stack:
        if DEVICE == "cpu" and not request.node.get_closest_marker(
                "cpu_kernels"):
            for op in OPS:
                stack.enter_context(op.set_kernel_enabled("cpu", False))
        yield
