"""Under torchrun (or alone, as one process): train one step of each
layout given as a JSON list of ``--set`` overrides, and write what each
process then holds, by the storage its tensors take, to
OUT/LAYOUT-RANK.json."""
import json
import os
import sys
from pathlib import Path

import torch

from coom.config import load_config
from coom.data.loader import Batch
from coom.parallel.build import build_model
from coom.parallel.mesh import start_world
from coom.train.optimizer import build_optimizer


def stored(tensors) -> int:
    """Bytes of the distinct storages under tensors."""
    storages = {}
    for tensor in tensors:
        if hasattr(tensor, "to_local"):
            tensor = tensor.to_local()
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def measure(overrides: list[str]) -> dict:
    config = load_config("tiny", overrides)
    cpu = torch.device("cpu")
    world = start_world(config.parallel, cpu)
    torch.manual_seed(0)
    model = build_model(config, world, cpu)
    optimizer = build_optimizer(model.model, config.optimizer, model.weights,
                                model.dtype)
    train = config.train
    shape = (train.micro_batch_size, config.data.seq_length)
    tokens = torch.randint(0, config.model.vocab_size, shape)
    batch = Batch(tokens, tokens, torch.ones(shape))
    count = train.global_batch_size // train.micro_batch_size \
        // world.data_size
    model.forward_backward([batch] * count, shape[0] * shape[1]
                           * count * world.data_size, 0.3)
    parameters = list(model.model.parameters())
    # Where the compute copies keep one micro-batch's gradients, theirs.
    holders = parameters if model.weights is None \
        else model.weights.holders()
    gradients = stored(p.grad for p in holders)
    optimizer.step()
    states = [value for state in optimizer.state.values()
              for value in state.values()]
    result = {"parameters": stored(parameters), "gradients": gradients,
              "optimizer states": sum(
                  (v.to_local() if hasattr(v, "to_local") else v).nbytes
                  for v in states),
              "buffers": stored(model.model.buffers())}
    if model.weights is not None:
        result["compute copies"] = stored(
            model.weights.copies)
    del model, optimizer
    world.close()
    return result


if __name__ == "__main__":
    layouts, out = json.loads(sys.argv[1]), Path(sys.argv[2])
    # One process runs without torchrun, and without a process group.
    launched = "RANK" in os.environ
    if launched:
        torch.distributed.init_process_group("gloo")
    for name, overrides in layouts.items():
        (out / f"{name}-{os.environ.get('RANK', 0)}.json").write_text(
            json.dumps(measure(overrides)))
    if launched:
        torch.distributed.destroy_process_group()
