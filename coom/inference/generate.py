"""Sampling with the compressed KV cache, and MTP self-speculative decoding.

Plain decoding feeds the prompt once, then one token per forward, each
attending to the cached latents (see ``coom.layers.cache``).

Self-speculative decoding (greedy only) uses the first MTP depth as the
draft model, as DeepSeek-V3 suggests: from the main model's last hidden
state and the token just chosen, the MTP depth guesses the token after it.
One main forward over (chosen, guess) then checks the guess and, when it
was right, gives the token after it too: two tokens for one main forward.
A wrong guess is dropped from the main cache. The output is the same as
plain greedy decoding.
"""
import time
from dataclasses import dataclass
from typing import Optional

import torch

from coom.errors import UserError
from coom.layers.cache import DecodingCache
from coom.models import Transformer


@dataclass
class Generation:
    """New tokens and what producing them took."""

    tokens: list[int]
    seconds: float
    cache_bytes: int
    drafted: int = 0
    accepted: int = 0


def choose(logits_bv: torch.Tensor, temperature: float, top_p: float,
           generator: Optional[torch.Generator]) -> torch.Tensor:
    """Next token per row: greedy at temperature 0, else sampled from the
    smallest set of tokens whose probability reaches top_p."""
    if temperature == 0:
        return logits_bv.argmax(-1)
    probs_bv = (logits_bv.float() / temperature).softmax(-1)
    if top_p < 1:
        sorted_bv, order_bv = probs_bv.sort(-1, descending=True)
        before_bv = sorted_bv.cumsum(-1) - sorted_bv
        sorted_bv = sorted_bv.masked_fill(before_bv >= top_p, 0)
        probs_bv = torch.zeros_like(probs_bv).scatter(-1, order_bv,
                                                      sorted_bv)
    return torch.multinomial(probs_bv, 1, generator=generator).squeeze(-1)


def _check(model: Transformer, prompt: list[int],
           max_new_tokens: int) -> None:
    if not prompt:
        raise UserError("the prompt is empty; give at least one token")
    if max_new_tokens < 1:
        raise UserError("ask for at least one new token")
    vocab = model.config.vocab_size
    if max(prompt) >= vocab or min(prompt) < 0:
        raise UserError(f"prompt token ids must lie in [0, {vocab})")


def check_sampling(temperature: float, top_p: float) -> None:
    """Refuse settings that sample nothing or a distorted distribution."""
    if not temperature >= 0:
        raise UserError(f"temperature must be 0 (greedy) or positive, got "
                        f"{temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"top-p must lie in (0, 1], got {top_p}")


@torch.no_grad()
def generate(model: Transformer, prompt: list[int], max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             stop: Optional[int] = None,
             absorbed: bool = True) -> Generation:
    """Continue prompt by up to max_new_tokens tokens (fewer at stop)."""
    _check(model, prompt, max_new_tokens)
    check_sampling(temperature, top_p)
    device = model.embed.weight.device
    generator = torch.Generator(device).manual_seed(seed)
    cache = DecodingCache(model.config, model.config.num_layers, 1,
                          len(prompt) + max_new_tokens, absorbed, device,
                          model.embed.weight.dtype)
    started = time.perf_counter()
    logits_bv = model(torch.tensor([prompt], device=device),
                      cache=cache)[:, -1]
    new = []
    while True:
        token_b = choose(logits_bv, temperature, top_p, generator)
        new.append(token_b.item())
        if new[-1] == stop or len(new) == max_new_tokens:
            break
        logits_bv = model(token_b[:, None], cache=cache)[:, -1]
    return Generation(new, time.perf_counter() - started, cache.nbytes)


@torch.no_grad()
def generate_speculative(model: Transformer, prompt: list[int],
                         max_new_tokens: int, stop: Optional[int] = None,
                         absorbed: bool = True) -> Generation:
    """Greedy decoding with the first MTP depth drafting one token ahead.
    """
    _check(model, prompt, max_new_tokens)
    if not model.mtp:
        raise UserError("speculative decoding drafts with the model's MTP "
                        "depths, and this model has none")
    config = model.config
    device, dtype = model.embed.weight.device, model.embed.weight.dtype
    capacity = len(prompt) + max_new_tokens + 1
    cache = DecodingCache(config, config.num_layers, 1, capacity, absorbed,
                          device, dtype)
    draft_cache = DecodingCache(config, 1, 1, capacity, absorbed, device,
                                dtype)
    started = time.perf_counter()
    tokens = torch.tensor([prompt], device=device)
    chosen = model(tokens, cache=cache)[:, -1:].argmax(-1)
    # The MTP depth reads main hidden state i with token i + 1.
    following = torch.cat([tokens[:, 1:], chosen], dim=1)
    new = [chosen.item()]
    drafted = accepted = 0
    while new[-1] != stop and len(new) < max_new_tokens:
        guess = model.draft(following, cache, draft_cache)[:, -1:] \
            .argmax(-1)
        best = model(torch.cat([chosen, guess], dim=1),
                     cache=cache).argmax(-1)
        drafted += 1
        if best[0, 0] == guess[0, 0]:
            accepted += 1
            following = torch.cat([guess, best[:, 1:]], dim=1)
        else:
            cache.truncate(cache.length - 1)
            following = best[:, :1]
        for token in following[0].tolist():
            if new[-1] != stop and len(new) < max_new_tokens:
                new.append(token)
        chosen = following[:, -1:]
    return Generation(new, time.perf_counter() - started, cache.nbytes,
                      drafted, accepted)
