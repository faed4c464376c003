"""The dispatcher: its reordering of received rows against a loop, and
a round trip over two processes."""
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
    dispatcher = AllToAll(mesh)
    x_rd, counts_l, state = dispatcher.dispatch(x_cd, counts_e)
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
    # Left to interpreter exit, gloo's threads abort the process at
    # times ("terminate called without an active exception").
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
