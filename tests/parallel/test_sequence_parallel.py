"""Tensor parallelism's pieces on two processes (torchrun, gloo): under
sequence parallelism each process's norms and feed-forward inputs hold
half the positions while
the model's features stay whole; the vocabulary-parallel cross-entropy
gives the whole head's loss and gradients, with a vocabulary that does
not split evenly. The runs of whole models against one process are in
``test_layouts``."""
from tests.launch import check, launch

SCRIPT = """
import gc

import torch
import torch.distributed as dist
from torch.distributed.tensor import Shard, distribute_tensor

from coom.config import ParallelConfig, load_config
from coom.kernels.cross_entropy import linear_cross_entropy_reference
from coom.models import Transformer
from coom.parallel.mesh import TENSOR, start_world
from coom.parallel.parallelize import parallelize
from coom.parallel.vocab import vocab_parallel_cross_entropy


def relative_error(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm())

parallel = ParallelConfig(tensor=2, sequence_parallel=True)
world = start_world(parallel, torch.device("cpu"))
rank = world.rank

# Norms read half the sequence; features come out whole.
config = load_config("tiny", ["model.vocab_size=64",
                              "model.num_layers=2"]).model
torch.manual_seed(0)
model = Transformer(config)
model.init_weights()
parallelize(model, world, parallel)
lengths = []
for block in model.layers.values():
    # The attention norm, and the feed-forward's input before it gathers
    # (the feed-forward's norm is fused with the residual add).
    for module in (block.attention_norm, block.mlp):
        module.register_forward_pre_hook(
            lambda module, args: lengths.append(args[0].shape[1]),
            prepend=True)
tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator()
                       .manual_seed(1))
features = []
model.norm.register_forward_hook(
    lambda module, args, output: features.append(output))
model(tokens, labels_bs=tokens)
assert lengths == [8, 8, 8, 8], lengths
assert tuple(features[0].shape) == (2, 16, config.hidden_size)

# The loss over a head of 101 rows split 51 + 50, against the whole.
generator = torch.Generator().manual_seed(2)
x = torch.randn(12, 8, generator=generator)
weight = torch.randn(101, 8, generator=generator)
labels = torch.randint(0, 101, (12,), generator=generator)
labels[:2] = torch.tensor([0, 100])  # the first and last rows
scale = torch.rand(12, generator=generator)
x_ours = x.clone().requires_grad_()
head = distribute_tensor(weight, world.mesh[TENSOR], [Shard(0)])
head.requires_grad_()
loss = vocab_parallel_cross_entropy(x_ours, head, labels, scale)
loss.backward()
x_ref, weight_ref = x.clone().requires_grad_(), weight.clone()
weight_ref.requires_grad_()
expected = linear_cross_entropy_reference(x_ref, weight_ref, labels, scale)
expected.backward()
# Both sum in float32 (the logits' dtype), in other orders.
assert relative_error(loss, expected) < 1e-6, (loss, expected)
assert relative_error(x_ours.grad, x_ref.grad) < 1e-6
assert relative_error(head.grad.full_tensor(), weight_ref.grad) < 1e-6
print(f"rank {rank} ok", flush=True)
gc.collect()  # see coom.parallel.mesh.World.close
dist.destroy_process_group()
"""


def test_sequence_split_and_vocabulary_parallel_loss(tmp_path):
    script = tmp_path / "pieces.py"
    script.write_text(SCRIPT)
    result = launch(2, str(script), timeout=120)
    check(result)
    assert "rank 0 ok" in result.stdout and "rank 1 ok" in result.stdout
