import pytest

from coom.config import ConfigError, RunConfig, load_config
from coom.errors import Adjusted, UserError


def test_tiny_recipe_loads_with_documented_values():
    config = load_config("tiny")
    assert isinstance(config, RunConfig)
    assert config.model.hidden_size == 256
    assert config.data.tokenizer_vocab_size == 8192
    assert config.model.vocab_size is None


def test_overrides_are_typed_yaml():
    config = load_config("tiny", [
        "train.steps=200", "model.hidden_size=512", "optimizer.lr=1e-3",
        "data.paths=[a.txt, b.jsonl]", "data.weights=[1, 3]",
        "model.share_embeddings_and_output_weights=true",
        "train.exit_interval=null"])
    assert config.train.steps == 200
    assert config.model.hidden_size == 512
    assert config.optimizer.lr == pytest.approx(1e-3)
    assert isinstance(config.optimizer.lr, float)
    assert config.data.paths == ["a.txt", "b.jsonl"]
    assert config.data.weights == [1.0, 3.0]
    assert config.model.share_embeddings_and_output_weights is True
    assert config.train.exit_interval is None


def test_recipe_file_path(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("train:\n  steps: 7\nschedule:\n"
                      "  lr_warmup_iters: 1\n")
    assert load_config(str(recipe)).train.steps == 7


def test_off_reads_as_a_word_not_a_boolean():
    """YAML reads a bare off as false; a choice that has "off" takes it."""
    assert load_config("tiny", ["fp8.recipe=off"]).fp8.recipe == "off"
    with pytest.raises(ConfigError, match="got True"):
        load_config("tiny", ["fp8.recipe=on"])


@pytest.mark.parametrize("overrides", [
    ["fp8.dispatch=true"],
    ["fp8.dispatch=true", "fp8.recipe=rowwise", "fp8.emulate=true"],
    ["fp8.dispatch=true", "fp8.recipe=blockwise", "fp8.experts=false"],
])
def test_fp8_dispatch_needs_blockwise_fp8_experts(overrides):
    with pytest.raises(ConfigError, match="fp8.dispatch: sends tokens"):
        load_config("tiny", overrides)
    config = load_config("tiny", ["fp8.dispatch=true",
                                  "fp8.recipe=blockwise"])
    assert config.fp8.dispatch


@pytest.mark.parametrize("override, field, words", [
    ("model.hidden_sise=3", "model.hidden_sise", "unknown key"),
    ("modle.hidden_size=3", "modle", "unknown key"),
    ("model.hidden_size=big", "model.hidden_size", "must be int"),
    ("model.hidden_size=2.5", "model.hidden_size", "must be int"),
    ("model.num_layers=true", "model.num_layers", "must be int"),
    ("optimizer.lr=fast", "optimizer.lr", "must be float"),
    ("data.paths=a.txt", "data.paths", "must be a list"),
    ("schedule.lr_decay_style=step", "schedule.lr_decay_style",
     "must be one of"),
    ("model.qk_rope_head_dim=15", "model.qk_rope_head_dim", "even"),
    ("train.global_batch_size=20", "train.global_batch_size",
     "not a multiple"),
    ("schedule.lr_wsd_decay_iters=290", "schedule.lr_wsd_decay_iters",
     "exceeds train.steps"),
    ("data.seq_length=4096", "data.seq_length", "exceeds"),
    ("optimizer.min_lr=1.0", "optimizer.min_lr", "must lie in"),
    ("model.hidden_size=-8", "model.hidden_size", "must be positive"),
    ("data.weights=[1.0]", "data.weights", "entries"),
    ("data.split='99'", "data.split", "validation"),
    ("data.split=99", "data.split", "must be str"),
    ("model=3", "model", "must be a mapping"),
    ("parallel.context=2", "parallel.context", "not supported yet"),
    ("parallel.tensor=3", "model.num_attention_heads", "does not split"),
    ("parallel.data_parallel_shard=0", "parallel.data_parallel_shard",
     "or -1"),
])
def test_bad_values_name_the_field(override, field, words):
    with pytest.raises(ConfigError) as caught:
        load_config("tiny", [override])
    assert caught.value.name == field
    message = str(caught.value)
    assert words in message and field in message
    assert "\n" not in message


def test_a_short_run_warms_up_over_its_whole_length():
    with pytest.warns(Adjusted, match="lr_warmup_iters 30 exceeds "
                      "train.steps 4; warming up over all 4 steps"):
        config = load_config("tiny", ["train.steps=4"])
    assert config.schedule.lr_warmup_iters == 4


@pytest.mark.parametrize("overrides, field, words", [
    (["parallel.expert=3"], "model.n_routed_experts", "do not split"),
    (["parallel.expert=2", "model.n_routed_experts=0"],
     "model.n_routed_experts", "positive multiple"),
    (["parallel.expert=2", "parallel.data_parallel_shard=3"],
     "parallel.expert", "does not divide data_parallel_shard"),
    (["parallel.tensor=2", "fp8.recipe=blockwise"], "parallel.tensor",
     "FP8"),
    (["parallel.tensor=2", "parallel.sequence_parallel=true",
      "data.seq_length=63"], "data.seq_length", "does not split"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel",
     "tensor > 1"),
    (["parallel.pipeline_schedule=ZBVZeroBubble",
      "parallel.pipeline_stages_per_process=3"],
     "parallel.pipeline_stages_per_process", "must be 2"),
    (["parallel.pipeline=3", "parallel.pipeline_schedule=DualPipeV"],
     "parallel.pipeline", "6 stages"),
    (["parallel.pipeline=2", "model.share_embeddings_and_output_weights=true"],
     "parallel.pipeline", "tied"),
    (["parallel.pipeline=2", "parallel.expert=2",
      "parallel.pipeline_schedule=InterleavedZeroBubble"],
     "parallel.pipeline_schedule", "does not run with expert parallelism"),
])
def test_impossible_parallelism_is_refused(overrides, field, words):
    with pytest.raises(ConfigError) as caught:
        load_config("tiny", overrides)
    assert caught.value.name == field
    message = str(caught.value)
    assert words in message and field in message
    assert "\n" not in message


@pytest.mark.parametrize("overrides, field", [
    (["n_routed_experts=6", "n_group=4"], "model.n_group"),
    (["n_routed_experts=6", "n_group=6"], "model.n_group"),
    (["n_routed_experts=8", "n_group=2", "topk_group=3"], "model.topk_group"),
    (["n_routed_experts=8", "n_group=4", "num_experts_per_tok=3"],
     "model.num_experts_per_tok"),
    (["first_k_dense_replace=9"], "model.first_k_dense_replace"),
])
def test_impossible_moe_routing_is_refused(overrides, field):
    with pytest.raises(ConfigError) as caught:
        load_config("tiny", [f"model.{o}" for o in overrides])
    assert caught.value.name == field


def test_groups_of_one_expert_are_ranked_by_their_best():
    config = load_config("tiny", ["model.n_routed_experts=6",
                                  "model.n_group=6", "model.topk_group=3",
                                  "model.topk_method=group_limited_greedy"])
    assert config.model.n_group == 6


def test_unknown_recipe_lists_known_ones():
    with pytest.raises(UserError, match="known recipes: .*tiny"):
        load_config("huge")


def test_override_without_equals_is_refused():
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config("tiny", ["train.steps"])


def test_invalid_yaml_recipe(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(str(recipe))


def test_reference_documents_every_field_and_is_current():
    from pathlib import Path

    from coom.config import config_reference
    reference = config_reference()
    for section in ("model", "data", "optimizer", "schedule", "train",
                    "checkpoint", "logging"):
        assert f"## `{section}`" in reference
    assert "| `hidden_size` | `256` | Width of the residual stream. |" \
        in reference
    docs = Path(__file__).resolve().parent.parent / "docs" / "config.md"
    assert docs.read_text() == reference, \
        "regenerate: .venv/bin/python -m coom.config > docs/config.md"
