"""The planner's memory: its allocation counter, the activations of the
recompute modes, the pipeline schedules' micro-batches in flight, the
``coom plan`` command and the warning ``coom train`` gives on a GPU."""
import dataclasses

import torch

from coom.cli import main
from coom.config import load_config
from coom.plan.dry_run import LiveBytes, dry_run, routed_copy_bytes
from coom.plan.fit import memory_warning, needed
from coom.plan.gpus import kind_of
from coom.plan.memory import (
    fullest,
    in_flight,
    memory_plan,
    moe_blocks,
    worst_routing,
)
from coom.plan.ranks import as_on_gpu

MIB = 2 ** 20
TINY = ["model.vocab_size=512", "train.micro_batch_size=2",
        "train.global_batch_size=8"]


def test_live_bytes_counts_storages_from_creation_to_last_use():
    live = LiveBytes()
    with live:
        a = torch.empty(MIB // 4, device="meta")
        b = a * 2
        view = b[: 10]
        assert live.now() == 2 * MIB
        del b
        assert live.now() == 2 * MIB  # the view keeps b's storage
        del view
        a.mul_(3)  # in place: nothing new
        assert live.now() == MIB
        for _ in range(3):
            c = a + 1
        assert live.now() == 2 * MIB
        del c
    assert live.peak == 3 * MIB  # while the loop's next c was made


def test_recompute_keeps_less_for_the_backward():
    saved = {}
    for mode in ("none", "selective", "full"):
        config = as_on_gpu(load_config(
            "tiny", TINY + [f"train.recompute={mode}"]), 80 * 2 ** 30)
        saved[mode] = dry_run(config).saved
    assert saved["none"] > saved["selective"] > saved["full"] > 0


def test_pipeline_schedules_keep_their_micro_batches_in_flight():
    def flight(schedule, rank, micro_batches=8):
        config = load_config("tiny", [
            "parallel.pipeline=4", f"parallel.pipeline_schedule={schedule}",
            "model.num_layers=8"])
        return in_flight(config, rank, micro_batches)
    assert [flight("1F1B", rank) for rank in range(4)] == [4, 3, 2, 1]
    assert flight("1F1B", 0, micro_batches=2) == 2
    assert flight("GPipe", 3) == 8
    assert flight("Interleaved1F1B", 0) == 2 * 3 + 4 + 1


def test_plan_prints_each_term_and_whether_it_fits(capsys):
    assert main(["plan", "tiny", "--gpus", "4", "--set", *TINY,
                 "parallel.pipeline=2"]) == 0
    out = capsys.readouterr().out
    for term in ("parameters", "gradients", "optimizer states",
                 "activations", "FSDP buffers", "allocated"):
        assert f"\n  {term} " in out
    assert "by pipeline rank: 0: " in out and ", fits\n" in out
    assert "\nallocated by train.recompute: none " in out
    assert "\nstep time " in out and "  pipeline bubble " in out


def test_train_warns_with_the_cheapest_fix_that_fits():
    config = as_on_gpu(load_config("tiny", TINY), 80 * 2 ** 30)
    peak = fullest(memory_plan(config, 1)).peak
    assert memory_warning(config, 1, needed(peak)) is None
    warning = memory_warning(config, 1, needed(peak) - 1)
    assert "the largest term is" in warning
    change = warning.split("--set ")[1].split()[0]
    fixed = as_on_gpu(load_config("tiny", TINY + [change]), 80 * 2 ** 30)
    assert needed(fullest(memory_plan(fixed, 1)).peak) < needed(peak)


def test_a_steps_only_micro_batch_makes_its_gradients_as_it_goes():
    """With one micro-batch a step the gradients start absent and come
    as the backward frees activations: the plan counts them inside the
    backward's peak, which holds at least all of them at its end, and
    plans no more than with the gradients there from the start."""
    config = as_on_gpu(load_config("tiny", [
        "model.vocab_size=512", "train.micro_batch_size=2",
        "train.global_batch_size=2"]), 80 * 2 ** 30)
    one = dry_run(config)
    (plan,) = memory_plan(config, 1, one)
    terms = {term.name: term.bytes for term in plan.terms}
    gradients = terms["parameters"]  # float32, as the masters
    assert "gradients" not in terms
    assert one.fresh_peak >= gradients
    assert terms["backward transients"] == one.fresh_peak - one.saved
    accumulating = plan.peak - terms["backward transients"] \
        + gradients + one.peak - one.saved
    assert plan.peak <= accumulating


def test_routed_copies_and_the_worst_routing():
    """A routed copy keeps its bf16 row on both sides of the experts and
    the experts' three intermediate rows, plus its routing weight and
    indices; under full recomputation only the latter, but its rows
    still pass through its block's forward. The worst routing sends every
    expert-parallel process's copies to one process's experts."""
    config = as_on_gpu(load_config("tiny", TINY + [
        "model.mtp_num_layers=0", "train.global_batch_size=4"]), 2 ** 36)
    model = config.model
    rows = 2 * (2 * model.hidden_size + 3 * model.moe_intermediate_size)
    copy = routed_copy_bytes(config)
    assert rows <= copy.kept <= rows + 32
    full = routed_copy_bytes(dataclasses.replace(config, train=(
        dataclasses.replace(config.train, recompute="full"))))
    assert full.kept <= 32  # the routing weight and indices alone
    assert full.passing >= 2 * 2 * model.hidden_size
    assert worst_routing(config, copy, 0, 1) == 0  # no expert parallelism
    two = as_on_gpu(load_config("tiny", TINY + [
        "model.mtp_num_layers=0", "parallel.expert=2"]), 2 ** 36)
    top = model.num_experts_per_tok
    worst = 2 * min(top, model.n_routed_experts // 2)
    blocks = model.num_layers - model.first_k_dense_replace
    tokens = 2 * config.data.seq_length
    assert worst_routing(two, copy, 0, 1) == round(
        (worst - top) * tokens * (copy.kept * blocks + copy.passing))


def test_coom_train_on_a_gpu_warns_before_it_starts(monkeypatch, capsys):
    """``coom train`` asks the plan before any process joins; the GPU is
    played by a device name and a memory size, the rest is the CLI's."""
    from types import SimpleNamespace

    import coom.train.device
    from coom.cli.train import _warn_of_memory
    config = load_config("tiny", TINY)
    monkeypatch.setattr(coom.train.device, "resolve_device",
                        lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(total_memory=2 ** 30))
    _warn_of_memory(config)
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(total_memory=2 ** 29))
    _warn_of_memory(config)
    out = capsys.readouterr().out
    assert out.startswith("warning: coom plan predicts ")
    # No change fits beside 0.5 GiB of CUDA context.
    assert out.rstrip().endswith("more than the GPU's 0.5 GiB; the largest "
                                 "term is activations (0.0 GiB); spread "
                                 "the model over more GPUs (coom plan)")


def test_moe_blocks_of_each_pipeline_rank():
    """tiny: 4 blocks, the first dense, and one MTP depth (an MoE block
    on the last stage)."""
    assert moe_blocks(load_config("tiny"), 0) == 4
    two = load_config("tiny", ["parallel.pipeline=2"])
    assert [moe_blocks(two, rank) for rank in (0, 1)] == [1, 3]


def test_a_process_holds_its_share_of_the_experts():
    """Under expert parallelism the dry run counts what grows with the
    experts (the FP8 copies of their weights, their weight gradients)
    for the process's share: here a quarter of tiny's 8 experts, which
    a dry run of a model of 2 experts counts directly. What is saved,
    and the peak with gradients there, grow with the experts in
    proportion and match exactly; the peak of a backward that makes
    the gradients is the largest of several moments, which the
    proportion follows to 1% (measured 0.15%, FP8)."""
    tiny = ["model.vocab_size=512", "model.mtp_num_layers=0",
            "train.micro_batch_size=4", "train.global_batch_size=4",
            "fp8.recipe=blockwise", "fp8.filter=false"]
    share = dry_run(as_on_gpu(load_config(
        "tiny", tiny + ["parallel.expert=4"]), 2 ** 36))
    direct = dry_run(as_on_gpu(load_config(
        "tiny", tiny + ["model.n_routed_experts=2"]), 2 ** 36))
    whole = dry_run(as_on_gpu(load_config("tiny", tiny), 2 ** 36))
    assert (share.saved, share.peak) == (direct.saved, direct.peak)
    assert share.saved < whole.saved
    assert abs(share.fresh_peak - direct.fresh_peak) \
        <= 0.01 * direct.fresh_peak


def test_bf16_moments_are_planned_at_every_layout(capsys):
    moments = "optimizer.moments_dtype=bf16"
    for gpus in ("1", "2"):
        assert main(["plan", "tiny", "--gpus", gpus, "--set", *TINY,
                     moments]) == 0
        assert "AdamW moments, bf16" in capsys.readouterr().out


def test_gpus_are_known_by_the_names_torch_gives_them():
    assert kind_of("NVIDIA H100 80GB HBM3") == "h100"
    assert kind_of("NVIDIA H200") == "h200"
    assert kind_of("NVIDIA H800 PCIe") == "h800"
    assert kind_of("NVIDIA GeForce RTX 4090") is None
