"""The planner's bytes of parameters, gradients, optimizer states,
compute copies and buffers, for every process of a layout, against what
the processes of a real run hold after a step of the tiny model, under
torchrun on gloo with 1, 2 and 4 processes: exact, by the storage the
tensors take (FSDP's padding included)."""
import json

import pytest

from coom.config import load_config
from coom.plan.ranks import rank_model
from coom.plan.states import state_terms
from tests.launch import check, launch

COMMON = ["train.device=cpu", "model.vocab_size=512", "data.seq_length=32",
          "model.num_layers=3", "train.micro_batch_size=1",
          "train.global_batch_size=8"]
BF16 = ["train.precision=bf16"]
LAYOUTS = {
    # One micro-batch a step: the bf16 gradients stay on the copies; and
    # DeepSeek-V3's bf16 moments.
    1: {"one-bf16": [*BF16, "train.global_batch_size=1",
                     "optimizer.moments_dtype=bf16"]},
    2: {
        "fsdp2": ["parallel.data_parallel_shard=2"],
        "fsdp2-bf16-step": ["parallel.data_parallel_shard=2",
                            "parallel.fsdp_reshard=step", *BF16,
                            "optimizer.moments_dtype=bf16"],
        "ep2": ["parallel.expert=2"],
        "tp2-bf16": ["parallel.tensor=2", *BF16,
                     "optimizer.moments_dtype=bf16"],
        "pp2": ["parallel.pipeline=2"],
        "pp2-bf16": ["parallel.pipeline=2", *BF16,
                     "optimizer.moments_dtype=bf16"],
    },
    4: {
        "hsdp2x2": ["parallel.data_parallel_replicate=2"],
        "fsdp4-bf16": BF16,
        "pp2-tp2-ep": ["parallel.pipeline=2", "parallel.tensor=2",
                       "parallel.sequence_parallel=true"],
        "fsdp2-ep2-bf16": ["parallel.expert=2", *BF16],
    },
}
MEASURED = ("parameters", "gradients", "optimizer states",
            "compute copies", "buffers")


@pytest.mark.parametrize("processes", sorted(LAYOUTS))
def test_state_bytes_are_exact_on_every_process(tmp_path, processes):
    layouts = {name: COMMON + overrides
               for name, overrides in LAYOUTS[processes].items()}
    check(launch(processes, "tests/plan/measure_states.py",
                 json.dumps(layouts), str(tmp_path)))
    for name, overrides in layouts.items():
        config = load_config("tiny", overrides)
        for rank in range(processes):
            real = json.loads((tmp_path / f"{name}-{rank}.json").read_text())
            with rank_model(config, processes, rank) as model:
                terms = {term.name: term.bytes
                         for term in state_terms(
                             model, 1, config.optimizer.moments_dtype)}
            planned = {key: terms.get(key) for key in MEASURED}
            assert planned == {key: real.get(key) for key in MEASURED}, \
                (name, rank)
