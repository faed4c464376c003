"""The decoding cache of a stack of MLA blocks, kept compressed.

Per token and block it holds the normalised KV latent and the rotated
shared key part, ``kv_lora_rank + qk_rope_head_dim`` values, where
multi-head attention would hold ``heads * (qk_head_dim + v_head_dim)``.
"""
import torch

from coom.config import ModelConfig
from coom.errors import UserError
from coom.layers.mla import LatentCache


class DecodingCache:
    """Latents of ``blocks`` MLA blocks for ``capacity`` positions.

    Args:
        config: the model config.
        blocks: how many blocks the cache serves.
        batch: sequences decoded together.
        capacity: most positions it will hold (prompt plus new tokens).
        absorbed: attend in the latent space (see ``coom.layers.mla``).
        device, dtype: where and how the latents are kept.
    """

    def __init__(self, config: ModelConfig, blocks: int, batch: int,
                 capacity: int, absorbed: bool = True,
                 device: torch.device = None,
                 dtype: torch.dtype = torch.float32):
        if capacity > config.max_position_embeddings:
            raise UserError(
                f"{capacity} positions exceed the model's "
                f"max_position_embeddings {config.max_position_embeddings}; "
                "shorten the prompt or ask for fewer new tokens")
        shape = (blocks, batch, capacity)
        self.latent = torch.zeros(*shape, config.kv_lora_rank,
                                  device=device, dtype=dtype)
        self.rope_key = torch.zeros(*shape, config.qk_rope_head_dim,
                                    device=device, dtype=dtype)
        self.absorbed = absorbed
        self.length = 0
        self.hidden_bsd = None
        """The last block's output at the positions the last forward
        fed, which Multi-Token Prediction drafts from."""

    @property
    def capacity(self) -> int:
        return self.latent.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes the cache takes for the positions it holds."""
        per_position = (self.latent[:, :, 0].nbytes
                        + self.rope_key[:, :, 0].nbytes)
        return per_position * self.length

    def layer(self, index: int) -> LatentCache:
        """Block index's view for a forward starting at ``length``."""
        return LatentCache(self.latent[index], self.rope_key[index],
                           self.length, self.absorbed)

    def advance(self, count: int) -> None:
        """Count positions were written by the forward that just ran."""
        if self.length + count > self.capacity:
            raise ValueError(f"cache of {self.capacity} positions cannot "
                             f"take {count} more after {self.length}")
        self.length += count

    def truncate(self, length: int) -> None:
        """Forget the positions from length on (rejected drafts), their
        hidden states included."""
        dropped = max(self.length - length, 0)
        self.length -= dropped
        if dropped and self.hidden_bsd is not None:
            self.hidden_bsd = self.hidden_bsd[:, :-dropped]
