"""The dispatcher's reordering of received rows, against a loop."""
import torch

from coom.parallel.expert import _expert_order


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
