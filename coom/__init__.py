"""COOM: pretraining for DeepSeek-V3-style language models."""
__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported on first use, so that ``coom --help`` stays instant.
    if name == "load_model":
        from coom.interop.weights import load_model
        return load_model
    raise AttributeError(f"module 'coom' has no attribute {name!r}")
