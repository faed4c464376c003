"""The model transform to FP8, the refusal on devices without FP8 units,
and a short emulated FP8 training run against the float32 one."""
import json

import pytest
import torch
from torch import nn

from coom.cli import main
from coom.config import FP8Config, ModelConfig
from coom.errors import UserError
from coom.fp8.convert import check_hardware, convert_to_fp8
from coom.fp8.linear import FP8Linear
from coom.fp8.modules import FP8GroupedExperts, FP8SwiGLU
from coom.layers.mlp import SwiGLU
from coom.models import Transformer
from coom.train.metrics import read_metrics
from tests.kernels import relative_error

EMULATED = dict(recipe="blockwise", emulate=True)


def _model(**overrides) -> Transformer:
    fields = dict(vocab_size=97, hidden_size=64, num_layers=3,
                  num_attention_heads=2, ffn_hidden_size=96, q_lora_rank=48,
                  kv_lora_rank=32, first_k_dense_replace=1, mtp_num_layers=1,
                  n_routed_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=32, n_shared_experts=1,
                  max_position_embeddings=64)
    config = ModelConfig(**{**fields, **overrides})
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu")
    model.init_weights()
    return model


def _fp8_layers(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules()
            if isinstance(module, (FP8Linear, FP8GroupedExperts))}


def test_converts_block_products_but_not_embedding_head_or_router():
    model = _model()
    before = {name: p.clone() for name, p in model.state_dict().items()}
    linears = {name for name, module in model.named_modules()
               if type(module) is nn.Linear}
    choices = convert_to_fp8(model, FP8Config(**EMULATED), tokens=80)
    # Emulation takes any width, and the filter is for FP8 units alone.
    assert all(c.fp8 and c.evidence is None for c in choices)
    assert {c.name for c in choices} == _fp8_layers(model)
    assert _fp8_layers(model) == linears - {"head"} | {
        f"{block}.mlp.experts" for block in
        ("layers.1", "layers.2", "mtp.0.block")}
    assert isinstance(model.embed, nn.Embedding)
    assert "mtp.0.eh_proj" in _fp8_layers(model)
    # Feed-forwards whose w1 and w3 converted quantise x once for both.
    assert all(isinstance(swiglu, FP8SwiGLU) for swiglu in (
        model.layers["0"].mlp, model.layers["1"].mlp.shared_experts))
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)


@pytest.mark.parametrize("expert_width", [128, 144])
def test_fp8_units_take_whole_tiles_only(expert_width):
    """Without emulation, MLA's latent projection (32 + 64 rope = 96
    wide here, 576 in the small preset) keeps its precision, and so do
    experts of a width that is not whole tiles: the run is told so."""
    model = _model(hidden_size=128, kv_lora_rank=32, qk_rope_head_dim=64,
                   q_lora_rank=128, num_attention_heads=1,
                   qk_nope_head_dim=64, v_head_dim=128, ffn_hidden_size=256,
                   moe_intermediate_size=expert_width)
    choices = convert_to_fp8(model, FP8Config(recipe="blockwise",
                                              filter=False), tokens=80)
    kept = {c.name for c in choices if not c.fp8}
    assert kept == {c.name for c in choices
                    if c.product.n % 128 or c.product.k % 128}
    assert "layers.0.attention.wkv_a" in kept
    assert type(model.layers["0"].attention.wkv_a) is nn.Linear
    assert isinstance(model.layers["0"].attention.wq_a, FP8Linear)
    assert isinstance(model.layers["0"].mlp.w1, FP8Linear)
    experts = model.layers["1"].mlp.experts
    assert isinstance(experts, FP8GroupedExperts) == (
        expert_width % 128 == 0)


def test_keeps_first_and_last_blocks_and_experts_when_asked():
    model = _model()
    convert_to_fp8(model, FP8Config(**EMULATED, experts=False,
                                    high_precision_first_layers=1,
                                    high_precision_last_layers=1),
                   tokens=80)
    converted = _fp8_layers(model)
    assert converted and all(name.startswith(("layers.1.", "mtp.0."))
                             for name in converted)
    assert not any(isinstance(module, FP8GroupedExperts)
                   for module in model.modules())
    assert type(model.layers["0"].mlp) is SwiGLU
    assert convert_to_fp8(_model(), FP8Config(), tokens=80) == []


def test_fp8_model_stays_close_to_float32_and_trains():
    tokens = torch.randint(0, 97, (2, 40), generator=torch.Generator()
                           .manual_seed(1))
    reference, model = _model(), _model()
    convert_to_fp8(model, FP8Config(**EMULATED), tokens=80)
    logits, ref_logits = model(tokens), reference(tokens)
    # One FP8 rounding of each operand is at most 2^-4 relative rms
    # (tests/fp8/test_linear.py); through the blocks' residual stream the
    # logits move by far less than that.
    assert relative_error(logits, ref_logits) < 2 ** -4
    logits.float().square().mean().backward()
    converted = [model.get_submodule(name) for name in _fp8_layers(model)
                 if not name.startswith("mtp.")]
    grads = [p.grad for module in converted for p in module.parameters()]
    # 5 attention projections a block, 3 in the dense MLP, 3 + 3 in each
    # MoE (experts and shared experts).
    assert len(grads) == 3 * 5 + 3 + 2 * (3 + 3)
    assert all(g is not None and torch.isfinite(g).all() and g.any()
               for g in grads)


def test_refused_without_fp8_units_unless_emulated():
    with pytest.raises(UserError, match="fp8.emulate=true"):
        check_hardware(FP8Config(recipe="blockwise"), torch.device("cpu"))
    check_hardware(FP8Config(**EMULATED), torch.device("cpu"))
    check_hardware(FP8Config(), torch.device("cpu"))


def test_cli_refuses_fp8_on_cpu_before_any_work(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "tiny", "--run-dir", str(run), "--set",
                 "fp8.recipe=blockwise", "train.device=cpu"]) == 2
    err = capsys.readouterr().err
    assert "FP8 matrix units" in err and "Traceback" not in err
    assert not (run / "metrics.jsonl").exists()


def test_emulated_fp8_run_follows_the_float32_run(small_run, tmp_path,
                                                  capsys):
    losses = {}
    fp8 = ["fp8.recipe=blockwise", "fp8.emulate=true"]
    for name, extra in [("fp32", []), ("fp8", fp8)]:
        run = tmp_path / name
        assert main(["train", "tiny", "--run-dir", str(run), "--set",
                     *small_run, *extra]) == 0
        losses[name] = [r["loss"] for r in read_metrics(run)
                        if "loss" in r]
    # The run says which products ran in FP8, and keeps it.
    assert "FP8 products: 24 of 24 in FP8" in capsys.readouterr().out
    recorded = json.loads((tmp_path / "fp8" / "fp8_products.json")
                          .read_text())
    assert len(recorded) == 24 and all(r["fp8"] for r in recorded)
    assert not (tmp_path / "fp32" / "fp8_products.json").exists()
    assert losses["fp8"] != losses["fp32"]
    for fp8, fp32 in zip(losses["fp8"], losses["fp32"]):
        assert abs(fp8 - fp32) / fp32 < 0.01


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="FP8 matrix units: run by .ci/gpu-tests")
def test_fp8_run_on_a_gpu_follows_the_bf16_run(small_run, tmp_path):
    losses = {}
    for name, extra in [("bf16", []), ("fp8", ["fp8.recipe=blockwise"])]:
        run = tmp_path / name
        assert main(["train", "tiny", "--run-dir", str(run), "--set",
                     *small_run, "train.precision=bf16", "fp8.filter=false",
                     *extra]) == 0
        losses[name] = [r["loss"] for r in read_metrics(run)
                        if "loss" in r]
    assert losses["fp8"] != losses["bf16"]
    for fp8, bf16 in zip(losses["fp8"], losses["bf16"]):
        assert abs(fp8 - bf16) / bf16 < 0.01
