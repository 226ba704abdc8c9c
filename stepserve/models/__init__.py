"""Models: one Llama-family implementation, the weight readers, the loader and the tokenizer."""
