"""Pooling and encoder tasks beside generation: embeddings, rerank/score, classification,
fill-mask and text2text, chosen by ``--task`` or inferred from the architecture as KServe's
Hugging Face server does. Encoder models run through ``transformers`` in a supervised core
process (``encoder_core``) with dynamic batching (``batcher``); the routes live in ``routes``."""
