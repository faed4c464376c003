"""COOM: pretraining for DeepSeek-V3-style language models."""
__version__ = "0.1.0"
