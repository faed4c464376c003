"""The FP8 filter: at the shipped presets, products convert exactly where
the H100 measurements say FP8 is faster; other shapes follow their
nearest measurement."""
import torch

from coom.config import FP8Config, load_config
from coom.fp8.convert import convert_to_fp8
from coom.fp8.filter import MEASURED, Product, describe, nearest
from coom.fp8.linear import FP8Linear
from coom.fp8.modules import FP8GroupedExperts
from coom.models import Transformer

BLOCKWISE = FP8Config(recipe="blockwise")


def _converted(recipe: str, config: FP8Config = BLOCKWISE,
               expert_ranks: int = 1):
    """The preset's model on the meta device, converted at its
    micro-batch, and the choices made."""
    run = load_config(recipe)
    with torch.device("meta"):
        model = Transformer(run.model)
    tokens = run.train.micro_batch_size * run.data.seq_length
    return model, convert_to_fp8(model, config, tokens, expert_ranks)


def _faster(product: Product) -> bool:
    (timing,) = [t for t in MEASURED if t.product == product]
    return timing.bf16_ms > timing.fp8_ms


def test_presets_convert_exactly_what_their_measurements_favour():
    for recipe in ("small", "medium"):
        model, choices = _converted(recipe)
        fits = [c for c in choices if c.evidence is not None]
        # Every product that fits FP8's units was measured at its own
        # shape, and follows the measurement.
        assert fits and all(c.evidence.product == c.product
                            and c.fp8 == _faster(c.product) for c in fits)
        fp8 = {name for name, module in model.named_modules()
               if isinstance(module, (FP8Linear, FP8GroupedExperts))}
        assert fp8 == {c.name for c in choices if c.fp8}
    # Where the table has FP8 losing at small: its attention projections
    # and its experts; only the dense feed-forwards are wide enough.
    model, choices = _converted("small")
    assert {(c.product.n, c.product.k) for c in choices if c.fp8} == {
        (4096, 1536), (1536, 4096)}
    assert not any(isinstance(module, FP8GroupedExperts)
                   for module in model.modules())


def test_filter_off_converts_every_product_that_fits():
    _, choices = _converted("small", FP8Config(recipe="blockwise",
                                               filter=False))
    assert all(c.fp8 == (c.product.n % 128 == c.product.k % 128 == 0)
               and c.evidence is None for c in choices)
    assert any(c.product.kind == "experts" and c.fp8 for c in choices)


def test_experts_receive_every_expert_rank_s_tokens():
    """Under expert parallelism each process's experts get the copies of
    all expert ranks' tokens: at medium, 8192 tokens x top 4 / 16
    experts each, times the ranks."""
    for ranks in (1, 4):
        _, choices = _converted("medium", expert_ranks=ranks)
        rows = {c.product.rows for c in choices
                if c.product.kind == "experts"}
        assert rows == {2048 * ranks}


def test_a_shape_not_measured_follows_the_nearest_measurement():
    # Measured ones are their own nearest.
    assert all(nearest(t.product) is t for t in MEASURED)
    # 3072 x 4096 at 8192 rows: 4096 x 4096 at 8192 is 4/3 of n away
    # (log2 0.42), 2048 x 4096 at 8192 3/2 (0.58), small's 1536 x 4096
    # twice n and twice the rows (2).
    shape = Product("linear", 8192, 3072, 4096)
    assert nearest(shape).product == Product("linear", 8192, 4096, 4096)
    # Experts are judged by experts' measurements only: DeepSeek-V3's
    # 7168 -> 2048 follow medium's 4096 -> 2048.
    v3 = nearest(Product("experts", 4096, 2048, 7168))
    assert v3.product == Product("experts", 2048, 2048, 4096)


def test_the_choices_are_described_by_shape():
    _, choices = _converted("small")
    lines = describe(choices).splitlines()
    converted = sum(c.fp8 for c in choices)
    assert lines[0] == (f"FP8 products: {converted} of {len(choices)} "
                        "in FP8")
    # One dense block: its w1 and w3, and its w2.
    assert converted == 3
    assert ("  FP8   2 x linear 4096 x 1536 (16384 rows): measured 1.06x"
            in lines)
    _, choices = _converted("medium", expert_ranks=2)
    assert ("  off   5 x experts 4096 -> 2048 (4096 rows each): measured "
            "0.87x at experts 4096 -> 2048 (2048 rows each)"
            in describe(choices).splitlines())
    assert any(line.startswith("  off") and "experts 1536 -> 512" in line
               and "0.67x" in line for line in lines)
    assert any("576 x 1536" in line and "widths FP8 cannot take" in line
               for line in lines)
