"""The DeepSeek-V3-style decoder: embedding, pre-norm blocks, output head.

Each block is MLA attention followed by a dense SwiGLU (the first
``first_k_dense_replace`` blocks) or DeepSeekMoE.

The model is single-device PyTorch. It is built on the ``meta`` device and
materialised with ``to_empty`` + ``init_weights``, so that large models
never allocate their weights twice and parallelism can be applied from
outside before any memory is touched.

Tensor names end in their shape: b batch; s sequence; d model width; v
vocabulary.
"""
import torch
from torch import nn
from torch.nn import functional

from coom.config import ModelConfig
from coom.layers.mla import MLA
from coom.layers.mlp import SwiGLU
from coom.layers.moe import MoE
from coom.layers.norm import RMSNorm
from coom.layers.rope import RotaryEmbedding


class Block(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then x + mlp.

    Args:
        config: the model config.
        index: position of the block, which decides dense or MoE.
    """

    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        eps = config.layernorm_epsilon
        self.attention_norm = RMSNorm(config.hidden_size, eps)
        self.attention = MLA(config)
        self.mlp_norm = RMSNorm(config.hidden_size, eps)
        if config.is_moe_layer(index):
            self.mlp = MoE(config)
        else:
            self.mlp = SwiGLU(config.hidden_size, config.ffn_hidden_size)

    def init_weights(self, std: float, num_layers: int) -> None:
        self.attention_norm.init_weights()
        self.mlp_norm.init_weights()
        self.attention.init_weights(std)
        if isinstance(self.mlp, MoE):
            self.mlp.init_weights(std)
        else:
            self.mlp.init_weights(std, num_layers)

    def forward(self, x_bsd: torch.Tensor,
                rope: RotaryEmbedding) -> torch.Tensor:
        x_bsd = x_bsd + self.attention(self.attention_norm(x_bsd), rope)
        return x_bsd + self.mlp(self.mlp_norm(x_bsd))


class Transformer(nn.Module):
    """Token ids (B, S) to next-token logits (B, S, V).

    Args:
        config: the model section of the run config; vocab_size must be
            resolved (not None).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be resolved")
        self.config = config
        self.rope = RotaryEmbedding(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Block(config, index) for index in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        # A tied head reads the embedding in forward rather than sharing
        # its Parameter: a shared Parameter comes apart in to_empty.
        self.head = None
        if not config.share_embeddings_and_output_weights:
            self.head = nn.Linear(config.hidden_size, config.vocab_size,
                                  bias=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Fill every parameter and buffer; call after ``to_empty``."""
        std = self.config.init_method_std
        self.rope.init_weights()
        nn.init.normal_(self.embed.weight, std=std)
        for block in self.layers:
            block.init_weights(std, self.config.num_layers)
        self.norm.init_weights()
        if self.head is not None:
            nn.init.normal_(self.head.weight, std=std)

    def moe_layers(self) -> dict[int, MoE]:
        """The MoE blocks' feed-forwards, by block index."""
        return {index: block.mlp for index, block in enumerate(self.layers)
                if isinstance(block.mlp, MoE)}

    def aux_loss(self) -> torch.Tensor:
        """Weighted auxiliary losses of the last training forward."""
        losses = [moe.aux_loss for moe in self.moe_layers().values()]
        return sum(losses) if losses else torch.zeros(())

    def finish_step(self) -> dict:
        """After an optimizer step: move expert biases, and return each MoE
        block's load statistics for the step's metrics."""
        metrics, max_vios = {}, []
        for index, moe in self.moe_layers().items():
            load = moe.finish_step()
            max_vio = (load.max() / load.mean() - 1).item()
            max_vios.append(max_vio)
            metrics[f"moe_max_vio_layer{index}"] = max_vio
            metrics[f"moe_dead_experts_layer{index}"] = int(
                (load == 0).sum())
            metrics[f"moe_load_layer{index}"] = load.int().tolist()
        if max_vios:
            metrics["moe_max_vio"] = sum(max_vios) / len(max_vios)
        return metrics

    def forward(self, tokens_bs: torch.Tensor) -> torch.Tensor:
        x_bsd = self.embed(tokens_bs)
        for block in self.layers:
            x_bsd = block(x_bsd, self.rope)
        x_bsd = self.norm(x_bsd)
        if self.head is None:
            return functional.linear(x_bsd, self.embed.weight)
        return self.head(x_bsd)
