"""The dispatcher: its reordering of received rows against a loop, and
a round trip over two processes; the expert-parallel replacement of the
experts against the whole experts."""
import textwrap

import torch

from coom.parallel.expert import _expert_order
from tests.launch import check, launch


def test_received_rows_reorder_by_local_expert_then_source():
    """3 source processes, 4 local experts, some blocks empty: the rows
    of each (source, local expert) block come out by local expert, then
    source, each block in its own order."""
    counts_pl = torch.tensor([[2, 0, 1, 3], [0, 0, 4, 1], [5, 2, 0, 1]])
    blocks, start = {}, 0
    for source, counts in enumerate(counts_pl.tolist()):
        for expert, count in enumerate(counts):
            blocks[expert, source] = list(range(start, start + count))
            start += count
    expected = [row for key in sorted(blocks) for row in blocks[key]]
    assert _expert_order(counts_pl, start).tolist() == expected


ROUND_TRIP = textwrap.dedent("""
    import gc

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from coom.parallel.expert import AllToAll

    mesh = init_device_mesh("cpu", (2,))
    rank = dist.get_rank()
    # 4 experts, 2 per process; each process routes its own counts. Row
    # values say where they came from: 100 * source + position.
    counts = [[3, 1, 0, 4], [1, 5, 2, 0]]
    counts_e = torch.tensor(counts[rank])
    x_cd = (100 * rank + torch.arange(int(counts_e.sum()))).float()
    x_cd = x_cd[:, None].repeat(1, 3).requires_grad_()
    dispatcher = AllToAll(mesh, experts=4)
    x_rd, counts_l, state = dispatcher.dispatch(x_cd, counts_e)
    x_rd = state.by_slot(x_rd)
    # Local expert j of this process is global expert 2 * rank + j: its
    # rows, from source 0 then source 1, in each source's order.
    experts = (2 * rank, 2 * rank + 1)
    expected = [100 * source + sum(counts[source][:expert]) + i
                for expert in experts for source in range(2)
                for i in range(counts[source][expert])]
    assert x_rd[:, 0].tolist() == expected, (rank, x_rd[:, 0].tolist())
    assert counts_l.tolist() == [counts[0][e] + counts[1][e]
                                 for e in experts]
    # An expert that doubles its rows: combine brings 2 x back in place,
    # and the gradient returns to each source's rows.
    y_cd = dispatcher.combine(2 * x_rd, state)
    assert torch.equal(y_cd, 2 * x_cd)
    y_cd.sum().backward()
    assert torch.equal(x_cd.grad, torch.full_like(x_cd, 2.0))
    print(f"rank {rank} ok", flush=True)
    # Left to interpreter exit, objects in reference cycles that hold
    # gloo's process group abort the process at times ("terminate called
    # without an active exception"; see coom.parallel.mesh.World.close).
    gc.collect()
    dist.destroy_process_group()
""")


def test_dispatch_and_combine_over_two_processes(tmp_path):
    """Rows reach the process of their expert, grouped by local expert
    then source, and come back to their own place with their gradient."""
    script = tmp_path / "round_trip.py"
    script.write_text(ROUND_TRIP)
    result = launch(2, str(script), timeout=120)
    check(result)
    assert "rank 0 ok" in result.stdout and "rank 1 ok" in result.stdout


PLACED = textwrap.dedent("""
    import gc

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from coom.parallel.expert import AllToAll
    from coom.parallel.placement import Placement

    mesh = init_device_mesh("cpu", (2,))
    rank = dist.get_rank()
    # 4 experts; process 0 owns 0 and 1, process 1 owns 2 and 3. Slots:
    # process 0 runs experts 0, 1, 3 and process 1 experts 2, 3, 0, so
    # experts 0 and 3 have a replica on each process.
    placement = Placement((0, 1, 3, 2, 3, 0), ranks=2, experts=4)
    counts = [[3, 1, 0, 4], [1, 5, 2, 3]]
    counts_e = torch.tensor(counts[rank])
    rows = int(counts_e.sum())
    x_cd = (100 * rank + torch.arange(rows)).double()[:, None]
    x_cd.requires_grad_()
    # Each expert multiplies by its own weight, 10 * expert + 1.
    w_l = torch.tensor([[10.0 * (2 * rank + j) + 1] for j in range(2)],
                       dtype=torch.double, requires_grad=True)
    dispatcher = AllToAll(mesh, experts=4)
    dispatcher.place(placement)
    x_rd, counts_l, state = dispatcher.dispatch(x_cd, counts_e)
    x_rd = state.by_slot(x_rd)
    (w_slots,) = dispatcher.slot_weights(w_l)
    slot_experts = placement.slot_expert[3 * rank:3 * rank + 3]
    assert w_slots[:, 0].tolist() == [10.0 * e + 1 for e in slot_experts]
    # Every row a slot receives was routed to its expert.
    expert_of = {}
    for source in range(2):
        position = 0
        for expert, count in enumerate(counts[source]):
            for _ in range(count):
                expert_of[100 * source + position] = expert
                position += 1
    starts = [0, *counts_l.cumsum(0).tolist()]
    for slot, expert in enumerate(slot_experts):
        got = x_rd[starts[slot]:starts[slot + 1], 0].tolist()
        assert all(expert_of[int(value)] == expert for value in got), (
            rank, slot, got)
    # Replicas of an expert share its copies within one: each process
    # splits its own copies so, starting at the replica of its rank.
    all_counts = [torch.zeros_like(counts_l) for _ in range(2)]
    dist.all_gather(all_counts, counts_l)
    per_slot = torch.cat(all_counts).tolist()
    for expert in range(4):
        shares = [per_slot[s] for s, e in enumerate(placement.slot_expert)
                  if e == expert]
        assert sum(shares) == counts[0][expert] + counts[1][expert]
        assert max(shares) - min(shares) <= 1, (expert, shares)
    y_rd = x_rd * w_slots.repeat_interleave(counts_l, dim=0)
    y_cd = dispatcher.combine(y_rd, state)
    expected = torch.tensor([[10.0 * expert_of[100 * rank + i] + 1]
                             for i in range(rows)], dtype=torch.double)
    assert torch.equal(y_cd, x_cd * expected)
    y_cd.sum().backward()
    assert torch.equal(x_cd.grad, expected)
    # An expert's weight gradient sums its rows over its replicas, on
    # the process that owns it.
    sums = [0.0] * 4
    for value, expert in expert_of.items():
        sums[expert] += value
    assert w_l.grad[:, 0].tolist() == sums[2 * rank:2 * rank + 2], (
        rank, w_l.grad)
    print(f"rank {rank} ok", flush=True)
    gc.collect()
    dist.destroy_process_group()
""")


def test_placed_dispatch_spreads_replicas_and_fetches_weights(tmp_path):
    """Under a placement with copies, each slot gets its expert's copies
    (replicas of one expert within one of each other) and weights, the
    outputs return in place, and each replica's weight gradient reaches
    the expert's owner."""
    script = tmp_path / "placed.py"
    script.write_text(PLACED)
    result = launch(2, str(script), timeout=120)
    check(result)
    assert "rank 0 ok" in result.stdout and "rank 1 ok" in result.stdout


REPLACED = textwrap.dedent("""
    import gc

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from coom.config import ModelConfig
    from coom.layers.moe import GroupedExperts
    from coom.parallel.expert import ExpertParallel

    mesh = init_device_mesh("cpu", (2,))
    rank = dist.get_rank()
    config = ModelConfig(hidden_size=8, n_routed_experts=4,
                         moe_intermediate_size=6)
    torch.manual_seed(0)
    whole = GroupedExperts(config)
    whole.init_weights(std=0.3, out_std=0.2)
    split = GroupedExperts(config)
    split.load_state_dict(whole.state_dict())
    split = ExpertParallel(split, mesh)
    assert split.state_dict().keys() == whole.state_dict().keys()
    assert not list(split.local.parameters())
    torch.manual_seed(1 + rank)
    counts_e = torch.randint(0, 5, (4,))
    x_cd = torch.randn(int(counts_e.sum()), 8)
    # What runs beside the experts comes back with their output.
    (out, beside), (expected, nothing) = (
        split(x_cd, counts_e, beside=lambda: 2 * x_cd),
        whole(x_cd, counts_e))
    torch.testing.assert_close(out, expected)
    assert torch.equal(beside, 2 * x_cd) and nothing is None
    out.square().sum().backward()
    expected.square().sum().backward()
    for name in ("w1", "w3", "w2"):
        grad = getattr(whole, name).grad
        dist.all_reduce(grad)
        torch.testing.assert_close(getattr(split, name).grad.full_tensor(),
                                   grad)
    print(f"rank {rank} ok", flush=True)
    gc.collect()
    dist.destroy_process_group()
""")


def test_expert_parallel_replaces_the_experts_under_their_names(tmp_path):
    """The replacement keeps the weights' names, and computes what the
    whole experts compute, gradients summed over the processes."""
    script = tmp_path / "replaced.py"
    script.write_text(REPLACED)
    result = launch(2, str(script), timeout=120)
    check(result)
    assert "rank 0 ok" in result.stdout and "rank 1 ok" in result.stdout


FP8_DISPATCHED = textwrap.dedent("""
    import gc

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from coom.config import ModelConfig
    from coom.fp8.dispatch import FP8Rows, InFlight
    from coom.fp8.linear import FP8Recipe
    from coom.fp8.modules import FP8GroupedExperts
    from coom.parallel.expert import ExpertParallel

    mesh = init_device_mesh("cpu", (2,))
    rank = dist.get_rank()
    # 200 columns: a whole 128-column tile and a part of one.
    config = ModelConfig(hidden_size=200, n_routed_experts=4,
                         moe_intermediate_size=64)
    recipe, transport = FP8Recipe("blockwise", emulate=True), \\
        FP8Rows(emulate=True)
    torch.manual_seed(0)
    whole = FP8GroupedExperts(config, recipe, transport=transport)
    whole.init_weights(std=0.3, out_std=0.2)
    split = FP8GroupedExperts(config, recipe, transport=transport)
    split.load_state_dict(whole.state_dict())
    split = ExpertParallel(split, mesh)
    torch.manual_seed(1 + rank)
    counts_e = torch.randint(0, 9, (4,))
    x_cd = torch.randn(int(counts_e.sum()), 200)
    # What travels: a byte per entry, and a float32 scale per tile.
    flight, _, _ = split.dispatcher.dispatch(x_cd, counts_e)
    assert isinstance(flight, InFlight)
    assert flight.values_rd.dtype == torch.uint8
    assert flight.scales_rh.dtype == torch.float32
    assert flight.scales_rh.shape == (len(flight.values_rd), 2)
    # The experts of both processes compute what one process computes
    # with its rows rounded in place, and the rows' gradients return.
    # The expert's products take both processes' rows, so float32 sums
    # them in another order: within 1e-5 relative in norm (measured up
    # to 4.1e-7), as tests/parallel/test_layouts.py bounds gradients;
    # entries near zero differ by more than their own rounding.
    def within_rounding(ours, expected):
        return (ours - expected).norm() < 1e-5 * expected.norm()

    ours, theirs = (x_cd.clone().requires_grad_() for _ in range(2))
    out, _ = split(ours, counts_e)
    expected, _ = whole(theirs, counts_e)
    assert within_rounding(out, expected)
    out.square().sum().backward()
    expected.square().sum().backward()
    assert within_rounding(ours.grad, theirs.grad)
    print(f"rank {rank} ok", flush=True)
    gc.collect()
    dist.destroy_process_group()
""")


def test_fp8_dispatch_sends_bytes_and_computes_what_one_process_does(
        tmp_path):
    """With tokens sent in FP8, the all-to-all moves E4M3 bytes and
    float32 tile scales; the experts' outputs and the rows' gradients
    are those of one process that rounds its rows the same way."""
    script = tmp_path / "fp8_dispatched.py"
    script.write_text(FP8_DISPATCHED)
    result = launch(2, str(script), timeout=120)
    check(result)
    assert "rank 0 ok" in result.stdout and "rank 1 ok" in result.stdout
