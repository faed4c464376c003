"""Inference: generation and sampling, with MTP speculative decoding."""
