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
same rule. With ``fp8.filter``, the blockwise recipe converts a product
only where FP8 runs it faster, by a table measured on an H100
(``coom.fp8.filter``). Converted layers are replaced
(``coom.fp8.modules``) by FP8 ones that hold the same Parameters: names,
values and checkpoints do not change.
"""
import torch
from torch import nn

from coom.config import FP8Config
from coom.errors import UserError
from coom.fp8.dispatch import FP8Rows
from coom.fp8.filter import Choice, Product, nearest
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


class _Converter:
    """Replaces a model's linears and experts by FP8 ones where they fit
    FP8's units and, with the filter, where FP8 makes them faster;
    records each choice."""

    def __init__(self, config: FP8Config, tokens: int, expert_ranks: int):
        self.recipe = recipe_of(config)
        self.experts = config.experts
        self.transport = FP8Rows(config.power_of_two_scales,
                                 config.emulate) if config.dispatch else None
        self.filtered = config.filter and config.recipe == "blockwise" \
            and not config.emulate
        self.tokens = tokens
        self.expert_ranks = expert_ranks
        self.choices: list[Choice] = []

    def _choose(self, name: str, product: Product) -> bool:
        """Whether the product named name runs in FP8, recorded. Experts
        whose tokens travel in FP8 (``fp8.dispatch``) stay in FP8
        whatever the filter would say: the user asked for it, and the
        tokens' FP8 form is the experts' own."""
        if not _fits_fp8_units((product.n, product.k), self.recipe):
            choice = Choice(name, product, False,
                            reason="widths FP8 cannot take")
        elif product.kind == "experts" and self.transport is not None:
            choice = Choice(name, product, True,
                            reason="fp8.dispatch sends their tokens in FP8")
        elif self.filtered:
            evidence = nearest(product)
            choice = Choice(name, product, evidence.speedup >= 1, evidence)
        else:
            choice = Choice(name, product, True)
        self.choices.append(choice)
        return choice.fp8

    def _expert_rows(self, experts: GroupedExperts) -> int:
        """Each local expert's rows at balanced routing."""
        config = experts.config
        return max(1, round(self.tokens * config.num_experts_per_tok
                            * self.expert_ranks / config.n_routed_experts))

    def convert(self, module: nn.Module, prefix: str) -> None:
        """Convert module's products, in place. A SwiGLU whose w1 and w3
        both converted becomes an FP8SwiGLU, which quantises x once for
        both."""
        for name, child in list(module.named_children()):
            path = prefix + name
            if type(child) is nn.Linear:
                product = Product("linear", self.tokens, child.out_features,
                                  child.in_features)
                if self._choose(path, product):
                    setattr(module, name, fp8_copy(child, self.recipe))
            elif type(child) is GroupedExperts:
                n, k = child.w1.shape[1:]
                product = Product("experts", self._expert_rows(child), n, k)
                if self.experts and self._choose(path, product):
                    setattr(module, name, FP8GroupedExperts.replacing(
                        child, self.recipe, self.transport))
            else:
                self.convert(child, path + ".")
                if type(child) is SwiGLU and all(
                        isinstance(linear, FP8Linear)
                        for linear in (child.w1, child.w3)):
                    setattr(module, name, FP8SwiGLU.replacing(child))


def convert_to_fp8(model: nn.Module, config: FP8Config, tokens: int,
                   expert_ranks: int = 1) -> list[Choice]:
    """Run the products of model's blocks (all but the configured first
    and last ones) and MTP modules in FP8, where the filter lets them;
    return what was done with each of those blocks' and modules' linears
    and, with fp8.experts, routed experts (none when the recipe is off).

    Args:
        model: the built model, before compilation.
        config: the FP8 config.
        tokens: the tokens of one micro-batch in one process, the rows
            of its linears.
        expert_ranks: the processes that split the routed experts, whose
            tokens each local expert receives.
    """
    if config.recipe == "off":
        return []
    converter = _Converter(config, tokens, expert_ranks)
    layers = len(model.layers)
    keep = set(range(config.high_precision_first_layers)) | set(range(
        layers - config.high_precision_last_layers, layers))
    for key, block in model.layers.items():
        if int(key) not in keep:
            converter.convert(block, f"layers.{key}.")
    for index, module in enumerate(model.mtp):
        converter.convert(module, f"mtp.{index}.")
    return converter.choices
