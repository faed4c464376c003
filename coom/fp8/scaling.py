"""FP8 scaling: how a matrix becomes E4M3 values and float32 scales.

A matrix is cut into groups of ``rows x columns`` entries; each group gets
one scale, its largest magnitude over E4M3's largest finite value (448),
so the group's values fill the format's range without overflow. A group
of zeros gets scale 1. With power-of-two scales the scale is rounded up
to a power of two, so scaling changes only exponents.

The recipes, for a matrix product ``A @ B^T`` that sums over the
columns of both operands (k):

- ``blockwise`` (DeepSeek-V3): activations and gradients in tiles of 1 x
  128 (per row, per 128 columns), weights in blocks of 128 x 128;
- ``rowwise``: one scale per row of each operand;
- ``tensorwise``: one scale per operand.

Shapes that are not multiples of a group are covered by ceil(n / 128)
groups; the last group is partial. Scales have shape (ceil(m / rows),
ceil(k / columns)).

Tensor names end in their shape: m rows; k columns; g row groups; h column
groups; e groups of rows; j row tiles of a transpose; c columns of a
tile-padded transpose (TILE per row tile).
"""
import math
from dataclasses import dataclass

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max
TILE = 128
RECIPES = ("blockwise", "rowwise", "tensorwise")


@dataclass(frozen=True)
class Grouping:
    """Rows and columns that share one scale (0: the whole dimension)."""

    rows: int
    columns: int

    def sizes(self, m: int, k: int) -> tuple[int, int]:
        return self.rows or max(m, 1), self.columns or max(k, 1)


def groupings(recipe: str) -> tuple[Grouping, Grouping]:
    """(activation grouping, weight grouping) of a recipe."""
    if recipe == "blockwise":
        return Grouping(1, TILE), Grouping(TILE, TILE)
    if recipe == "rowwise":
        return Grouping(1, 0), Grouping(1, 0)
    if recipe == "tensorwise":
        return Grouping(0, 0), Grouping(0, 0)
    raise ValueError(f"unknown FP8 recipe {recipe!r}; expected one of "
                     f"{', '.join(RECIPES)}")


def _padded_groups(x_mk: torch.Tensor, rows: int,
                   columns: int) -> torch.Tensor:
    """x zero-padded to whole groups, viewed as (g, rows, h, columns)."""
    m, k = x_mk.shape
    groups, column_groups = math.ceil(m / rows), math.ceil(k / columns)
    padded = x_mk.new_zeros(groups * rows, column_groups * columns)
    padded[:m, :k] = x_mk
    return padded.view(groups, rows, column_groups, columns)


def _expand(scale_gh: torch.Tensor, rows: int, columns: int, m: int,
            k: int) -> torch.Tensor:
    """Each group's scale repeated over its entries, cropped to (m, k)."""
    return scale_gh.repeat_interleave(rows, 0).repeat_interleave(
        columns, 1)[:m, :k]


def quantize(x_mk: torch.Tensor, grouping: Grouping,
             power_of_two: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 values (m, k), float32 scales (g, h)) with x = values *
    scale to within E4M3's rounding."""
    m, k = x_mk.shape
    rows, columns = grouping.sizes(m, k)
    amax_gh = _padded_groups(x_mk.float(), rows, columns).abs().amax(
        dim=(1, 3))
    # A tensor divisor: CUDA divides by a Python number as a product with
    # its reciprocal, one ulp off the IEEE quotient the kernels compute.
    scale_gh = torch.where(amax_gh > 0,
                           amax_gh / amax_gh.new_tensor(E4M3_MAX), 1.0)
    if power_of_two:
        scale_gh = torch.exp2(torch.ceil(torch.log2(scale_gh)))
    # Times the reciprocal, one division per group, as the kernels do.
    reciprocal_gh = scale_gh.reciprocal()
    scaled_mk = x_mk.float() * _expand(reciprocal_gh, rows, columns, m, k)
    return scaled_mk.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale_gh


def dequantize(values_mk: torch.Tensor, scale_gh: torch.Tensor,
               grouping: Grouping) -> torch.Tensor:
    """float32 values * their group's scale."""
    m, k = values_mk.shape
    rows, columns = grouping.sizes(m, k)
    return values_mk.float() * _expand(scale_gh, rows, columns, m, k)


def fake_quantize(x_mk: torch.Tensor, grouping: Grouping,
                  power_of_two: bool = False) -> torch.Tensor:
    """x rounded to what its FP8 form holds, in float32 (emulation)."""
    return dequantize(*quantize(x_mk, grouping, power_of_two), grouping)


def group_tile_starts(counts_e: torch.Tensor) -> torch.Tensor:
    """Index of each group's first tile when consecutive groups of rows
    (counts_e rows each) start new tiles of TILE rows: the exclusive
    cumulative sum of ceil(count / TILE), int32."""
    tiles_e = (counts_e + TILE - 1) // TILE
    return (tiles_e.cumsum(0) - tiles_e).to(torch.int32)


def max_group_tiles(m: int, groups: int) -> int:
    """A bound on the tiles of m rows in that many groups, known without
    reading the counts."""
    return math.ceil(m / TILE) + groups


def quantize_transposed(x_mk: torch.Tensor, counts_e: torch.Tensor = None,
                        power_of_two: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """x^T quantised in 1 x TILE tiles along m, the operand layout of a
    weight gradient that sums over rows (tokens): (values, scales).

    Without counts_e, values (k, m) and scales (k, ceil(m / TILE)).

    With counts_e, each group of consecutive rows starts a new tile, so
    no tile mixes two groups (experts), and each tile gets its own TILE
    columns: values (k, TILE j) and scales (k, j), j = ``max_group_tiles``.
    Group e's tiles are those from t_e = ``group_tile_starts(counts_e)[e]``
    on: tile t_e + i is the columns [TILE (t_e + i), TILE (t_e + i + 1))
    of the values, with scale column t_e + i, and group e's rows are the
    first counts_e[e] columns from TILE t_e. The other columns (the tail
    of each group's last tile, and unused tiles) hold zeros; unused tiles
    get scale 1.
    """
    m, k = x_mk.shape
    if counts_e is None:
        return quantize(x_mk.T, Grouping(1, TILE), power_of_two)
    tiles = max_group_tiles(m, len(counts_e))
    values_kc = torch.zeros(k, tiles * TILE, dtype=E4M3, device=x_mk.device)
    scales_kj = x_mk.new_ones(k, tiles, dtype=torch.float32)
    counts, starts = counts_e.tolist(), group_tile_starts(counts_e).tolist()
    rows = 0
    for count, tile in zip(counts, starts):
        values, scales = quantize(x_mk[rows:rows + count].T,
                                  Grouping(1, TILE), power_of_two)
        values_kc[:, tile * TILE:tile * TILE + count] = values
        scales_kj[:, tile:tile + scales.shape[1]] = scales
        rows += count
    return values_kc, scales_kj
