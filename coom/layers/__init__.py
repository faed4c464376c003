"""Building blocks of the model: norms, rotary embeddings, attention, MLPs,
and the compressed decoding cache their attention reads."""
