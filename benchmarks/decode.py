"""Decoding with MLA's compressed cache against a decompressed per-head one.

The `small` preset (random weights, bf16, rope tables for 32K positions)
decodes one token per sequence per step after a context of 4K or 32K
positions, at batch 1 and 64, in two ways:

- latent: COOM's DecodingCache keeps per position and block only the
  normalised latent and the rotated shared key part, and attends in the
  latent space (W_UK and W_UV absorbed);
- per-head: every block keeps keys (h x 192) and values (h x 128) per
  position, as multi-head attention would, and attends with SDPA.

The caches are filled with random values up to the context (what they
hold does not change the time), then decode steps are timed. Where a cache
does not fit, the line says so, with the most sequences that would.

Run on the device machine from the repository root:

    python3 benchmarks/decode.py
"""
import time
from dataclasses import replace

import torch
from torch import nn
from torch.nn import functional

from coom.config import load_config
from coom.layers.cache import DecodingCache
from coom.layers.mla import MLA
from coom.models import Transformer

CONTEXTS = (4096, 32768)
BATCHES = (1, 64)
STEPS = 16


class PerHeadAttention(nn.Module):
    """An MLA block's attention with a decompressed per-head cache."""

    def __init__(self, mla: MLA, batch: int, capacity: int, start: int):
        super().__init__()
        self.mla = mla
        config = mla.config
        heads = config.num_attention_heads
        weight = mla.wkv_b.weight
        self.keys = torch.randn(batch, heads, capacity, config.qk_head_dim,
                                device=weight.device, dtype=weight.dtype)
        self.values = torch.randn(batch, heads, capacity, config.v_head_dim,
                                  device=weight.device, dtype=weight.dtype)
        self.length = start

    def forward(self, x_bsd, rope, cache=None):
        mla, config = self.mla, self.mla.config
        start, end = self.length, self.length + x_bsd.shape[1]
        q_nope, q_pe = mla.queries(x_bsd).split(
            [config.qk_nope_head_dim, config.qk_rope_head_dim], dim=-1)
        q_bshk = torch.cat([q_nope, rope(q_pe, start)], dim=-1)
        kv_bsr, k_pe_bsp = mla.latents(x_bsd, rope, start)
        heads = config.num_attention_heads
        k_nope, v_bshv = mla.wkv_b(kv_bsr).unflatten(-1, (heads, -1)).split(
            [config.qk_nope_head_dim, config.v_head_dim], dim=-1)
        k_pe = k_pe_bsp.unsqueeze(2).expand(-1, -1, heads, -1)
        self.keys[:, :, start:end] = torch.cat([k_nope, k_pe],
                                               -1).transpose(1, 2)
        self.values[:, :, start:end] = v_bshv.transpose(1, 2)
        o_bhsv = functional.scaled_dot_product_attention(
            q_bshk.transpose(1, 2), self.keys[:, :, :end],
            self.values[:, :, :end], scale=mla.softmax_scale)
        self.length = end
        return mla.wo(o_bhsv.transpose(1, 2).flatten(2))


def build_model():
    positions = max(CONTEXTS) + STEPS + 3
    config = load_config(
        "small", [f"model.max_position_embeddings={positions}"])
    model_config = replace(config.model,
                           vocab_size=config.data.tokenizer_vocab_size)
    with torch.device("meta"):
        model = Transformer(model_config)
    model.to_empty(device="cuda")
    model.init_weights()
    return model.to(torch.bfloat16).eval()


def decode_rate(model, batch: int, step) -> float:
    """Tokens per second of STEPS decode steps after 3 warm-up steps."""
    tokens = torch.randint(1000, (batch, 1), device="cuda")
    for _ in range(3):
        step(tokens)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(STEPS):
        step(tokens)
    torch.cuda.synchronize()
    return batch * STEPS / (time.perf_counter() - started)


def latent_run(model, batch: int, context: int) -> tuple[float, int]:
    config = model.config
    cache = DecodingCache(config, config.num_layers, batch,
                          context + STEPS + 3, device="cuda",
                          dtype=torch.bfloat16)
    cache.latent.normal_()
    cache.rope_key.normal_()
    cache.length = context
    rate = decode_rate(model, batch, lambda tokens: model(tokens, cache=cache))
    return rate, cache.nbytes // (cache.length * batch)


def per_head_run(model, batch: int, context: int) -> tuple[float, int]:
    originals = [block.attention for block in model.layers.values()]
    try:
        for block in model.layers.values():
            block.attention = PerHeadAttention(
                block.attention, batch, context + STEPS + 3, context)
        attention = [block.attention for block in model.layers.values()]
        per_position = sum(a.keys[:, :, 0].nbytes + a.values[:, :, 0].nbytes
                           for a in attention) // batch
        rate = decode_rate(model, batch, model)
    finally:
        for block, original in zip(model.layers.values(), originals):
            block.attention = original
    return rate, per_position


def main() -> None:
    torch.manual_seed(0)
    model = build_model()
    free = torch.cuda.mem_get_info()[0]
    print(f"{torch.cuda.get_device_name()}: small preset, bf16, "
          f"{free / 2 ** 30:.0f} GiB free after the weights")
    with torch.inference_mode():
        for context in CONTEXTS:
            for batch in BATCHES:
                for label, run in (("latent", latent_run),
                                   ("per-head", per_head_run)):
                    try:
                        rate, per_token = run(model, batch, context)
                    except torch.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        print(f"context {context:6d} batch {batch:3d} "
                              f"{label:9s} does not fit")
                        continue
                    torch.cuda.empty_cache()
                    fits = free // (per_token * context)
                    print(f"context {context:6d} batch {batch:3d} "
                          f"{label:9s} {rate:9.1f} tokens/s  "
                          f"{per_token:6d} B/token cache  "
                          f"{fits:5d} sequences fit")


if __name__ == "__main__":
    main()
