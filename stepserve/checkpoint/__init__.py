"""What a model checkpoint is without its weights, read without PyTorch: where it lives (a
directory, a GGUF file, the hub, the embedded default), its config, its tokenizer and chat
template, its sampling defaults. The HTTP front reads these; ``models/`` loads the weights."""
