"""FP8 training after DeepSeek-V3's fine-grained recipe, without
Transformer Engine: scaling recipes (``scaling``) and the FP8 linear
(``linear``; so far its float32 emulation, which the tests check the
numerics with)."""
