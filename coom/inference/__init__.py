"""Inference: the compressed KV cache and sampling."""
