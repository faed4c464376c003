"""``coom plan --search``: what it tries, and what it returns."""
from dataclasses import replace

from coom.cli import main
from coom.config import load_config
from coom.parallel.mesh import degrees
from coom.plan.fit import needed
from coom.plan.gpus import GPUS
from coom.plan.ranks import as_on_gpu
from coom.plan.search import layouts, search

TINY = ["model.vocab_size=512", "train.global_batch_size=16"]


def test_layouts_split_every_gpu_and_respect_the_model():
    config = load_config("tiny", TINY)
    found = list(layouts(config, 8))
    for layout in found:
        assert layout["pipeline"] * layout["tensor"] \
            * layout["data_parallel_replicate"] \
            * layout["data_parallel_shard"] == 8
        assert layout["data_parallel_shard"] % layout["expert"] == 0
        assert config.model.num_attention_heads % layout["tensor"] == 0
    assert {layout["expert"] for layout in found} == {1, 2, 4, 8}
    # tiny has 4 layers: no pipeline of 8 stages.
    assert config.model.num_layers == 4
    assert {layout["pipeline"] for layout in found} == {1, 2, 4}


def test_hsdp_shards_within_a_node():
    """At 32 GPUs, HSDP's shard group and tensor parallelism's together
    fill one node of 8."""
    config = load_config("tiny", TINY)
    hybrid = [layout for layout in layouts(config, 32)
              if layout["data_parallel_replicate"] > 1]
    assert hybrid
    for layout in hybrid:
        assert layout["data_parallel_shard"] * layout["tensor"] == 8


def test_search_returns_settings_that_fit_fastest_first():
    gpu = GPUS["h100"]
    found = search(load_config("tiny", TINY), 2, gpu, show_progress=False)
    speeds = [c.plan.time.tokens_per_second for c in found]
    assert speeds == sorted(speeds, reverse=True) and len(found) > 4
    for candidate in found:
        assert needed(candidate.plan.fullest.peak) <= gpu.memory
        again = as_on_gpu(load_config("tiny", TINY
                                      + list(candidate.overrides)),
                          gpu.memory)
        shard = degrees(again.parallel, 2)["dp_shard"]  # -1 fills in
        assert replace(again.parallel, data_parallel_shard=shard) \
            == candidate.config.parallel
        assert again.train == candidate.config.train


def test_search_prints_commands(capsys):
    assert main(["plan", "tiny", "--gpus", "2", "--search", "--set",
                 *TINY]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("settings fit; the fastest, by the plan:")
    assert "torchrun --nproc-per-node 2 -m coom train tiny --run-dir " \
        "runs/tiny-2 --set model.vocab_size=512" in lines[1]


def test_a_searched_setting_replaces_the_one_given(capsys):
    """A micro-batch size given and one the search chose: the command
    sets the chosen one alone."""
    assert main(["plan", "tiny", "--gpus", "2", "--search", "--set",
                 *TINY, "train.micro_batch_size=1"]) == 0
    commands = capsys.readouterr().out.splitlines()[1:]
    assert commands
    for command in commands:
        assert command.count("train.micro_batch_size=") == 1


def test_launch_commands_fill_nodes_of_8():
    from coom.cli.plan import _launch
    assert _launch("small", 1) == "coom train small"
    assert _launch("small", 4).startswith("torchrun --nproc-per-node 4 ")
    assert _launch("small", 16).startswith(
        "torchrun --nnodes 2 (with your rendezvous options) "
        "--nproc-per-node 8 ")


def test_gpus_beyond_a_node_come_in_whole_nodes(capsys):
    assert main(["plan", "tiny", "--gpus", "12"]) == 2
    assert "give whole nodes" in capsys.readouterr().err


def test_search_proposes_only_pipelines_whose_schedule_runs():
    """At a global batch of 8 on 2 GPUs, a pipeline of 2 stages (1F1B)
    with micro-batches of 8 would run one a step, which torch's schedule
    refuses once built (``test_pipeline``): the search, which builds no
    schedule, leaves it out and keeps the pipelines that run."""
    config = load_config("tiny", ["model.vocab_size=512",
                                  "train.global_batch_size=8",
                                  "train.micro_batch_size=1"])
    found = search(config, 2, GPUS["h100"], show_progress=False)
    piped = [candidate.config.train for candidate in found
             if candidate.config.parallel.pipeline == 2]
    assert piped
    for train in piped:
        assert train.global_batch_size // train.micro_batch_size >= 2
