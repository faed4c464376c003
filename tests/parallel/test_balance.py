"""The expert balancer of one process: after the optimizer step it moves
the expert biases against the step's load, resets the counts, and
reports the loads only when asked."""
from dataclasses import replace

import torch

from coom.config import ModelConfig
from coom.layers.moe import MoE
from coom.parallel.balance import ExpertBalancer
from coom.parallel.mesh import World

CONFIG = ModelConfig(hidden_size=16, n_routed_experts=8,
                     num_experts_per_tok=2, moe_intermediate_size=8,
                     moe_aux_loss_coeff=0.01)


def _layers(config: ModelConfig, count: int) -> dict[int, MoE]:
    torch.manual_seed(0)
    layers = {}
    for index in range(1, count + 1):
        layers[index] = MoE(config)
        layers[index].init_weights(std=0.3)
    return layers


def test_biases_move_against_each_layers_load_and_counts_reset():
    layers = _layers(CONFIG, 2)
    for moe in layers.values():
        moe(torch.randn(4, 9, 16))
    loads = {index: moe.tokens_per_expert.clone()
             for index, moe in layers.items()}
    aux = sum(moe.aux_loss_sum.clone() for moe in layers.values())
    balancer = ExpertBalancer(layers, World(0, 1, None), micro_batches=2)
    balancer.after_step()
    rate = CONFIG.moe_router_bias_update_rate
    for index, moe in layers.items():
        load = loads[index]
        assert torch.equal(moe.router.bias,
                           rate * torch.sign(load.mean() - load))
        assert moe.tokens_per_expert.sum() == 0 and moe.aux_loss_sum == 0
    metrics = balancer.metrics()
    assert list(metrics)[0] == "aux_loss"
    assert metrics["aux_loss"] == (aux / 2).item()
    for index, load in loads.items():
        assert metrics[f"moe_load_layer{index}"] == load.int().tolist()
        assert metrics[f"moe_max_vio_layer{index}"] == \
            (load.max() / load.mean() - 1).item()
        assert metrics[f"moe_dead_experts_layer{index}"] == \
            int((load == 0).sum())
    assert metrics["moe_max_vio"] == (
        metrics["moe_max_vio_layer1"] + metrics["moe_max_vio_layer2"]) / 2


def test_a_step_the_device_holds_back_moves_no_bias():
    """A step launched before the host judged it (``applies`` false on
    the device: its loss was not finite) leaves the biases, and still
    starts the next step's counts afresh."""
    layers = _layers(CONFIG, 1)
    layers[1](torch.randn(4, 9, 16))
    assert layers[1].tokens_per_expert.sum() > 0
    ExpertBalancer(layers, World(0, 1, None), 1).after_step(
        torch.tensor(False))
    assert layers[1].router.bias.abs().sum() == 0
    assert layers[1].tokens_per_expert.sum() == 0


def test_biases_stay_when_balancing_is_off():
    config = replace(CONFIG, moe_router_enable_expert_bias=False)
    layers = _layers(config, 1)
    layers[1](torch.randn(2, 5, 16))
    ExpertBalancer(layers, World(0, 1, None), 1).after_step()
    assert layers[1].router.bias.abs().sum() == 0
    assert layers[1].tokens_per_expert.sum() == 0


def test_a_model_without_moe_reports_nothing():
    balancer = ExpertBalancer({}, World(0, 1, None), 1)
    balancer.after_step()
    assert balancer.metrics() == {}
