"""The DeepSeek-V3-style decoder: embedding, pre-norm blocks, output head.

Each block is MLA attention followed by a dense SwiGLU (the first
``first_k_dense_replace`` blocks) or DeepSeekMoE.

The model is single-device PyTorch. It is built on the ``meta`` device and
materialised with ``to_empty`` + ``init_weights``, so that large models
never allocate their weights twice and parallelism can be applied from
outside before any memory is touched.

It has one forward, for training, evaluation, decoding and pipeline
stages alike: token ids in, logits out, or given labels the losses of
the main model and of each Multi-Token Prediction depth. A pipeline
stage is this model with only its own parts (``part``): without the
embedding it reads the previous stage's hidden state, and without the
final norm it hands its own on.

Tensor names end in their shape: b batch; s sequence; d model width; v
vocabulary.
"""
from typing import Optional

import torch
from torch import nn

from coom.config import ModelConfig
from coom.layers.block import Block
from coom.layers.cache import DecodingCache
from coom.layers.head import OutputHead
from coom.layers.moe import MoE
from coom.layers.mtp import MTPModule
from coom.layers.norm import RMSNorm
from coom.layers.rope import RotaryEmbedding


def loss_scales(loss_mask_bs: torch.Tensor, depth: int,
                tokens: int) -> torch.Tensor:
    """Each token's weight in depth's loss (b, s - depth): its mask over
    its share of tokens, so that the loss is a mean over tokens however
    the step is cut (the depth's positions are fewer by depth)."""
    length = loss_mask_bs.shape[1]
    share = (length - depth) / length
    return loss_mask_bs[:, depth:] / (tokens * share)


class Transformer(nn.Module):
    """Token ids (b, s) to next-token logits (b, s, v), or to the losses of
    the main model and its Multi-Token Prediction depths.

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
        # Given its weight, the embedding skips its own initialisation
        # (init_weights draws it): on the meta device, drawing normal
        # values imports torch._dynamo, a second of CPU.
        self.embed = nn.Embedding(
            config.vocab_size, config.hidden_size,
            _weight=torch.empty(config.vocab_size, config.hidden_size))
        # Keyed by index, so that pipeline parallelism can drop the blocks
        # of other stages and keep the names of the rest.
        self.layers = nn.ModuleDict(
            {str(index): Block(config, index, fused_kernels)
             for index in range(config.num_layers)})
        self.norm = RMSNorm(config.hidden_size, config.layernorm_epsilon,
                            fused_kernels)
        # A tied head reads the embedding's weight in forward rather than
        # sharing its Parameter: a shared Parameter comes apart in
        # to_empty.
        self.head = OutputHead(config.hidden_size, config.vocab_size,
                               config.share_embeddings_and_output_weights,
                               fused_kernels)
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
        self.head.init_weights(std)

    def part(self, layers: list[int], first: bool,
             last: bool) -> "Transformer":
        """The pipeline stage of blocks layers, with the embedding if
        first and the final norm, head and MTP depths if last: a model
        whose modules are this one's, not copies."""
        part = Transformer.__new__(Transformer)
        nn.Module.__init__(part)
        part.config = self.config
        part.rope = self.rope
        part.embed = self.embed if first else None
        part.layers = nn.ModuleDict({str(index): self.layers[str(index)]
                                     for index in layers})
        part.norm = self.norm if last else None
        part.head = self.head if last else None
        part.mtp = self.mtp if last else nn.ModuleList()
        return part

    def keep_only(self, parts: list["Transformer"]) -> None:
        """Drop what none of parts (this process's stages) holds."""
        kept = {key for part in parts for key in part.layers}
        self.layers = nn.ModuleDict({key: block for key, block
                                     in self.layers.items() if key in kept})
        if all(part.embed is None for part in parts):
            self.embed = None
        if all(part.norm is None for part in parts):
            self.norm = self.head = None
            self.mtp = nn.ModuleList()

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

    def _head(self, x_bsd: torch.Tensor, *targets) -> torch.Tensor:
        tied = self.embed.weight if self.head.weight is None else None
        return self.head(x_bsd, tied, *targets)

    def forward(self, x: torch.Tensor, *aheads: torch.Tensor,
                labels_bs: Optional[torch.Tensor] = None,
                loss_mask_bs: Optional[torch.Tensor] = None,
                loss_tokens: Optional[int] = None,
                cache: Optional[DecodingCache] = None):
        """Logits (b, s, v) of token ids x (b, s); given labels_bs, the
        losses instead, stacked (1 + depths,): the main model's, then in
        training each MTP depth k's, whose targets are labels_bs[:, k:].

        Each loss sums its tokens' cross-entropies (those loss_mask_bs
        keeps; all by default) over loss_tokens (labels_bs's count by
        default): a step of several micro-batches passes its own count,
        so that their losses add up to its mean.

        A pipeline stage without the embedding reads the previous stage's
        hidden state as x, and the MTP depths' embeddings of the tokens
        ahead as aheads; a stage without the final norm returns its own
        (each a copy: a stage's output must not be its input). Given a
        cache, x continues the positions it holds, and it holds theirs,
        and the last block's output, afterwards.
        """
        if self.embed is not None:
            if aheads:
                raise TypeError("a model with its embedding takes the "
                                "token ids alone as positional argument")
            h_bsd = self.embed(x)
            aheads = self._ahead_embeddings(labels_bs)
        else:
            h_bsd = x
        for key, block in self.layers.items():
            h_bsd = block(h_bsd, self.rope,
                          None if cache is None else cache.layer(int(key)))
        if cache is not None:
            cache.advance(x.shape[1])
            cache.hidden_bsd = h_bsd
        if self.norm is None:
            return h_bsd, *(ahead.clone() for ahead in aheads)
        if labels_bs is None:
            return self._head(self.norm(h_bsd))
        if loss_mask_bs is None:
            loss_mask_bs = torch.ones_like(labels_bs, dtype=torch.float)
        loss_tokens = loss_tokens or labels_bs.numel()
        features = self._features(h_bsd, aheads if self.training else ())
        return torch.stack([
            self._head(x_bsd, labels_bs[:, depth:],
                       loss_scales(loss_mask_bs, depth, loss_tokens))
            for depth, x_bsd in enumerate(features)])

    def _ahead_embeddings(self, labels_bs: Optional[torch.Tensor]
                          ) -> list[torch.Tensor]:
        """What each MTP depth k reads besides the hidden state: the
        embedding of the tokens k places ahead, (b, s - k, d)."""
        if labels_bs is None:
            return []
        length = labels_bs.shape[1]
        return [self.embed(labels_bs[:, depth - 1:length - 1])
                for depth in range(1, self.config.mtp_num_layers + 1)]

    def _features(self, h_bsd: torch.Tensor,
                  aheads: list[torch.Tensor]) -> list[torch.Tensor]:
        """What the output head reads, from the last block's output: the
        normalised hidden state of the main model (b, s, d), then of each
        MTP depth k given aheads (b, s - k, d)."""
        features = [self.norm(h_bsd)]
        length = h_bsd.shape[1]
        for depth, (module, ahead_bsd) in enumerate(zip(self.mtp, aheads),
                                                    start=1):
            h_bsd = module(h_bsd[:, :length - depth], ahead_bsd, self.rope)
            features.append(module.norm(h_bsd))
        return features

    def draft(self, following_bs: torch.Tensor, cache: DecodingCache,
              draft_cache: DecodingCache) -> torch.Tensor:
        """Logits (b, s, v) of the first MTP depth, drafting the token
        after each of following_bs: it reads the main model's last hidden
        state (``cache.hidden_bsd``), position i with token i + 1 of
        following_bs. draft_cache is the depth's own cache."""
        depth = self.mtp[0]
        g_bsd = depth(cache.hidden_bsd, self.embed(following_bs), self.rope,
                      draft_cache.layer(0))
        draft_cache.advance(following_bs.shape[1])
        return self._head(depth.norm(g_bsd))
