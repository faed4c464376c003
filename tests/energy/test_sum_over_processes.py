"""The energy sum runs over every process of the run: two processes on
gloo, each with its own figures."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from coom.energy.ledger import sum_over_processes


def _worker(rank: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=2)
    try:
        results[rank] = sum_over_processes([rank + 1.0, 0.25 * rank, 1.0],
                                           torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def test_all_processes_get_the_sum(tmp_path):
    results = mp.get_context("spawn").Manager().dict()
    mp.spawn(_worker, args=(str(tmp_path / "init"), results), nprocs=2)
    assert results[0] == results[1] == [3.0, 0.25, 2.0]


def test_one_process_sums_nothing():
    assert sum_over_processes([1.5, 2.0], torch.device("cpu")) == [1.5, 2.0]
