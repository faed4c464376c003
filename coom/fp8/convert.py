"""Turning a model's products to FP8: one transform, applied to the
built model before ``torch.compile``.

As in DeepSeek-V3, the linears of the transformer blocks (attention
projections, dense and shared-expert feed-forwards) and the MTP modules'
projections convert, and so do the routed experts; the embedding, the
output head and the router keep their precision, and so do norms and
attention, which are not matrix products of weights. On FP8 matrix
units (cuBLAS) a linear converts only when its widths are whole
128-column tiles (blockwise) or multiples of 16 (rowwise, tensorwise), as
torchao filters them too: in the ``small`` preset that keeps MLA's
576-wide latent projection (wkv_a) in bf16. The routed experts follow the
same rule. Converted layers are replaced (``coom.fp8.modules``) by FP8
ones that hold the same Parameters: names, values and checkpoints do not
change.
"""
from typing import Optional

import torch
from torch import nn

from coom.config import FP8Config
from coom.errors import UserError
from coom.fp8.dispatch import FP8Rows
from coom.fp8.linear import FP8Linear, FP8Recipe
from coom.fp8.modules import FP8GroupedExperts, FP8SwiGLU, fp8_copy
from coom.fp8.scaling import TILE
from coom.layers.mlp import SwiGLU
from coom.layers.moe import GroupedExperts


def recipe_of(config: FP8Config) -> FP8Recipe:
    return FP8Recipe(config.recipe, config.power_of_two_scales,
                     config.emulate)


def check_hardware(config: FP8Config, device: torch.device) -> None:
    """Refuse FP8 on a device without FP8 matrix units, unless the
    recipe is emulated."""
    if config.recipe == "off" or config.emulate:
        return
    needed = (9, 0) if config.recipe == "blockwise" else (8, 9)
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability >= needed:
            return
        name = (f"{torch.cuda.get_device_name(device)} (compute capability "
                f"{capability[0]}.{capability[1]})")
    else:
        name = f"the {device.type} device"
    raise UserError(
        f"fp8.recipe={config.recipe} needs FP8 matrix units (an NVIDIA GPU "
        f"of compute capability {needed[0]}.{needed[1]} or newer); "
        f"{name} has none. Set fp8.emulate=true to run the recipe emulated "
        "in float32 (slow, for checking numerics), or fp8.recipe=off.")


def _fits_fp8_units(widths: tuple[int, int], recipe: FP8Recipe) -> bool:
    """Whether the FP8 products take a layer's input and output widths:
    whole 128-column tiles for blockwise scaling, multiples of 16
    otherwise (cuBLAS; COOM's grouped kernels need 16 too). Emulation
    takes any width."""
    multiple = TILE if recipe.scaling == "blockwise" else 16
    return recipe.emulate or all(width % multiple == 0 for width in widths)


def _convert(module: nn.Module, recipe: FP8Recipe, experts: bool,
             transport: Optional[FP8Rows]) -> int:
    """Replace module's linears (and experts, whose tokens travel by
    transport) by FP8 ones, in place; return how many products
    converted. A SwiGLU whose w1 and w3 both converted becomes an
    FP8SwiGLU, which quantises x once for both."""
    converted = 0
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            if _fits_fp8_units((child.in_features, child.out_features),
                               recipe):
                setattr(module, name, fp8_copy(child, recipe))
                converted += 1
        elif type(child) is GroupedExperts:
            if experts and _fits_fp8_units(tuple(child.w1.shape[1:]),
                                           recipe):
                setattr(module, name, FP8GroupedExperts.replacing(
                    child, recipe, transport))
                converted += 1
        else:
            converted += _convert(child, recipe, experts, transport)
            if type(child) is SwiGLU and all(
                    isinstance(linear, FP8Linear)
                    for linear in (child.w1, child.w3)):
                setattr(module, name, FP8SwiGLU.replacing(child))
    return converted


def convert_to_fp8(model: nn.Module, config: FP8Config) -> int:
    """Run the products of model's blocks (all but the configured first
    and last ones) and MTP modules in FP8; return how many layers
    converted (0 when the recipe is off)."""
    if config.recipe == "off":
        return 0
    recipe = recipe_of(config)
    transport = FP8Rows(config.power_of_two_scales, config.emulate) \
        if config.dispatch else None
    layers = len(model.layers)
    keep = set(range(config.high_precision_first_layers)) | set(range(
        layers - config.high_precision_last_layers, layers))
    converted = sum(_convert(block, recipe, config.experts, transport)
                    for key, block in model.layers.items()
                    if int(key) not in keep)
    return converted + sum(_convert(module, recipe, config.experts,
                                    transport)
                           for module in model.mtp)
