"""The FP8 filter: at the shipped presets, products convert exactly where
the H100 measurements say FP8 is faster; other shapes follow their
nearest measurement; experts whose tokens travel in FP8 stay in FP8; a
run prints and records the choices."""
import json

import torch

from coom.config import FP8Config, load_config
from coom.fp8.convert import convert_to_fp8
from coom.fp8.filter import MEASURED, Product, describe, nearest
from coom.fp8.linear import FP8Linear
from coom.fp8.modules import FP8GroupedExperts
from coom.models import Transformer
from coom.plan.ranks import rank_model
from coom.train.run_dir import FP8_PRODUCTS, record_fp8_choices

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
    return timing.bf16_ms >= timing.fp8_ms


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
    experts each, times the ranks, as the built model of one of 4
    processes (the planner's, on the meta device) counts them."""
    config = load_config("medium", ["fp8.recipe=blockwise",
                                    "parallel.expert=4",
                                    "train.global_batch_size=8"])
    with rank_model(config, 4, 1) as model:
        choices = model.fp8_choices
    rows = {c.product.rows for c in choices if c.product.kind == "experts"}
    assert rows == {2048 * 4}
    assert {c.product.rows for c in choices
            if c.product.kind == "linear"} == {8192}


def test_experts_sending_tokens_in_fp8_stay_in_fp8():
    """fp8.dispatch asks for FP8 experts, which the filter would keep in
    bf16 at small; the run says why they are FP8."""
    model, choices = _converted("small", FP8Config(recipe="blockwise",
                                                   dispatch=True))
    experts = [c for c in choices if c.product.kind == "experts"]
    assert experts and all(
        c.fp8 and c.evidence is None and "fp8.dispatch" in c.reason
        for c in experts)
    assert all(type(module.mlp.experts) is FP8GroupedExperts
               and module.mlp.experts.transport is not None
               for key, module in model.layers.items() if key != "0")
    # The linears still follow the table.
    assert all(c.fp8 == _faster(c.product) for c in choices
               if c.evidence is not None)


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
    # One dense block: its w1 and w3, and its w2.
    assert converted == 3
    assert lines[0] == (f"FP8 products: {converted} of {len(choices)} in "
                        "FP8, the others in train.precision (table: "
                        "H100 SXM)")
    # Those in FP8 first, then the others, most numerous first.
    assert lines[1:3] == [
        "  FP8    2 x linear 1536 -> 4096 (16384 rows), e.g. "
        "layers.0.mlp.w1: measured FP8 at 1.09x bf16's speed",
        "  FP8    1 x linear 4096 -> 1536 (16384 rows), e.g. "
        "layers.0.mlp.w2: measured FP8 at 1.06x bf16's speed"]
    assert lines[3].startswith("  kept  22 x linear 1536 -> 1024")
    assert ("  kept  12 x linear 1536 -> 576 (16384 rows), e.g. "
            "layers.0.attention.wkv_a: widths FP8 cannot take") in lines
    _, choices = _converted("medium", expert_ranks=2)
    assert ("  kept   5 x experts 4096 -> 2048 (4096 rows each), e.g. "
            "layers.1.mlp.experts: nearest measurement, experts 4096 -> "
            "2048 (2048 rows each): 0.93x bf16's speed"
            in describe(choices).splitlines())


def test_a_run_in_which_fp8_gains_nothing_says_so():
    run = load_config("tiny", ["model.vocab_size=512"])
    with torch.device("meta"):
        model = Transformer(run.model)
    lines = describe(convert_to_fp8(model, BLOCKWISE, 4096)).splitlines()
    assert lines[0].startswith("FP8 products: 0 of ")
    assert "fp8.filter=false converts them anyway" in lines[-1]


def test_a_start_without_fp8_removes_the_record(tmp_path):
    _, choices = _converted("small")
    record_fp8_choices(tmp_path, choices)
    recorded = json.loads((tmp_path / FP8_PRODUCTS).read_text())
    assert [r["name"] for r in recorded] == [c.name for c in choices]
    assert sum(r["fp8"] for r in recorded) == 3
    assert recorded[0]["measured_speedup"] == round(
        nearest(choices[0].product).speedup, 3)
    record_fp8_choices(tmp_path, [])
    assert not (tmp_path / FP8_PRODUCTS).exists()
