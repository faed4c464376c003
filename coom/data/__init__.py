"""Text in, token samples out: corpus, tokenizer, preparation, loading."""
