"""What the FP8 tests share."""


def run_product(product, x, weight, dy):
    """(y, dx, dweight) of y = product(x, weight) with dy flowing back."""
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    y = product(x, weight)
    y.backward(dy)
    return y, x.grad, weight.grad


def outputs_and_gradients(function, tensors, dy):
    """function's output, then the gradient of each of tensors, for the
    output gradient dy."""
    leaves = [tensor.clone().requires_grad_() for tensor in tensors]
    out = function(*leaves)
    out.backward(dy)
    return [out, *(leaf.grad for leaf in leaves)]
