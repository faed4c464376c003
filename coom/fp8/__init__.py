"""FP8 training after DeepSeek-V3's fine-grained recipe, without
Transformer Engine: scaling recipes (``scaling``), the FP8 linear
(``linear``) and the experts' grouped products (``grouped``), each on FP8
matrix units or emulated in float32, the Triton and cuBLAS calls as
custom ops (``ops``), and the model transform (``convert``)."""
