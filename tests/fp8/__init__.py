"""What the FP8 tests share."""


def run_product(product, x, weight, dy):
    """(y, dx, dweight) of y = product(x, weight) with dy flowing back."""
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    y = product(x, weight)
    y.backward(dy)
    return y, x.grad, weight.grad
