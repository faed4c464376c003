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
from typing import Optional

import torch
from torch import nn
from torch.nn import functional

from coom.config import ModelConfig
from coom.layers.block import Block
from coom.layers.cache import DecodingCache
from coom.layers.moe import MoE
from coom.layers.mtp import MTPModule
from coom.layers.norm import RMSNorm
from coom.layers.rope import RotaryEmbedding


def ahead_embeddings(embed: nn.Embedding, labels_bs: torch.Tensor,
                     depths: int) -> list[torch.Tensor]:
    """What each MTP depth k reads besides the hidden state: the embedding
    of the tokens k places ahead, (b, s - k, d)."""
    length = labels_bs.shape[1]
    return [embed(labels_bs[:, depth - 1:length - 1])
            for depth in range(1, depths + 1)]


def head_features(h_bsd: torch.Tensor, aheads: list[torch.Tensor],
                  norm: RMSNorm, mtp: nn.ModuleList,
                  rope: RotaryEmbedding) -> list[torch.Tensor]:
    """What the output head reads, from the last block's output: the
    normalised hidden state of the main model (b, s, d) and of each MTP
    depth k (b, s - k, d), given ``ahead_embeddings``."""
    outputs = [norm(h_bsd)]
    length = h_bsd.shape[1]
    for depth, (module, ahead_bsd) in enumerate(zip(mtp, aheads), start=1):
        h_bsd = module(h_bsd[:, :length - depth], ahead_bsd, rope)
        outputs.append(module.norm(h_bsd))
    return outputs


class Transformer(nn.Module):
    """Token ids (b, s) to next-token logits (b, s, v), plus the logits of
    the Multi-Token Prediction depths when training asks for them.

    Args:
        config: the model section of the run config; vocab_size must be
            resolved (not None).
        fused_kernels: let the layers call the fused ops
            (``coom.kernels``: Triton on GPUs, the references elsewhere)
            rather than the plain references (train.kernels).
    """

    def __init__(self, config: ModelConfig, fused_kernels: bool = True):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be resolved")
        self.config = config
        self.rope = RotaryEmbedding(config, fused_kernels)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        # Keyed by index, so that pipeline parallelism can drop the blocks
        # of other stages and keep the names of the rest.
        self.layers = nn.ModuleDict(
            {str(index): Block(config, index, fused_kernels)
             for index in range(config.num_layers)})
        self.norm = RMSNorm(config.hidden_size, config.layernorm_epsilon,
                            fused_kernels)
        # A tied head reads the embedding in forward rather than sharing
        # its Parameter: a shared Parameter comes apart in to_empty.
        self.head = None
        if not config.share_embeddings_and_output_weights:
            self.head = nn.Linear(config.hidden_size, config.vocab_size,
                                  bias=False)
        self.mtp = nn.ModuleList(
            MTPModule(config, config.num_layers + depth, fused_kernels)
            for depth in range(config.mtp_num_layers))

    @torch.no_grad()
    def init_weights(self) -> None:
        """Fill every parameter and buffer; call after ``to_empty``."""
        std = self.config.init_method_std
        self.rope.init_weights()
        nn.init.normal_(self.embed.weight, std=std)
        for block in [*self.layers.values(), *self.mtp]:
            block.init_weights(std, self.config.num_layers)
        self.norm.init_weights()
        if self.head is not None:
            nn.init.normal_(self.head.weight, std=std)

    def blocks(self) -> list[Block]:
        """The transformer blocks: the main stack's, then each MTP
        depth's."""
        return [*self.layers.values(), *(module.block for module in self.mtp)]

    def compile_blocks(self) -> None:
        """Compile each block (main and MTP) with ``torch.compile``; the
        parameter names stay as they were."""
        for block in self.blocks():
            block.compile()

    def moe_layers(self) -> dict[int, MoE]:
        """The MoE feed-forwards, by block index (MTP depths follow the
        main blocks, as in the checkpoint layout)."""
        blocks = {int(key): block for key, block in self.layers.items()}
        blocks |= {self.config.num_layers + depth: module.block
                   for depth, module in enumerate(self.mtp)}
        return {index: block.mlp for index, block in blocks.items()
                if isinstance(block.mlp, MoE)}

    def aux_loss(self) -> torch.Tensor:
        """Weighted auxiliary losses of the last training forward."""
        losses = [moe.aux_loss for moe in self.moe_layers().values()]
        return sum(losses) if losses else torch.zeros(())

    def finish_step(self) -> dict:
        """After an optimizer step: move expert biases, and return each MoE
        block's load statistics for the step's metrics."""
        metrics = {}
        for index, moe in self.moe_layers().items():
            load = moe.finish_step()
            metrics[f"moe_max_vio_layer{index}"] = \
                (load.max() / load.mean() - 1).item()
            metrics[f"moe_dead_experts_layer{index}"] = int(
                (load == 0).sum())
            metrics[f"moe_load_layer{index}"] = load.int().tolist()
        return metrics

    def head_weight(self) -> torch.Tensor:
        """The output head's weight (v, d): the embedding's when tied."""
        return self.embed.weight if self.head is None else self.head.weight

    def logits(self, h_bsd: torch.Tensor,
               norm: RMSNorm) -> torch.Tensor:
        """The shared output head over norm(h)."""
        return functional.linear(norm(h_bsd), self.head_weight())

    def hidden(self, tokens_bs: torch.Tensor,
               cache: Optional[DecodingCache] = None) -> torch.Tensor:
        """The last block's output (b, s, d), before the final norm.

        Given a cache, tokens_bs continue the positions it holds, and it
        holds theirs afterwards.
        """
        h_bsd = self.embed(tokens_bs)
        for key, block in self.layers.items():
            layer_cache = None if cache is None else cache.layer(int(key))
            h_bsd = block(h_bsd, self.rope, layer_cache)
        if cache is not None:
            cache.advance(tokens_bs.shape[1])
        return h_bsd

    def forward(self, tokens_bs: torch.Tensor,
                cache: Optional[DecodingCache] = None) -> torch.Tensor:
        return self.logits(self.hidden(tokens_bs, cache), self.norm)

    def features(self, tokens_bs: torch.Tensor) -> torch.Tensor:
        """What the output head reads: the normalised last hidden state."""
        return self.norm(self.hidden(tokens_bs))

    def features_with_mtp(self, tokens_bs: torch.Tensor,
                          labels_bs: torch.Tensor) -> list[torch.Tensor]:
        """``head_features`` of tokens_bs; depth k's targets are
        labels_bs[:, k:]."""
        aheads = ahead_embeddings(self.embed, labels_bs, len(self.mtp))
        return head_features(self.hidden(tokens_bs), aheads, self.norm,
                             self.mtp, self.rope)

    def forward_with_mtp(self, tokens_bs: torch.Tensor,
                         labels_bs: torch.Tensor) -> list[torch.Tensor]:
        """Logits of the main model (b, s, v) and of each MTP depth k
        (b, s - k, v), whose targets are labels_bs[:, k:]."""
        return [functional.linear(x_bsd, self.head_weight())
                for x_bsd in self.features_with_mtp(tokens_bs, labels_bs)]
