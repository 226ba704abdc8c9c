"""Worker construction, below the engine: ``builder`` makes what computes a scheduler pass (the
model, its KV cache and its ``ModelRunner``, started as a tensor-parallel group when asked) and
``tensor_parallel`` is that group's worker on rank 0 and the loop of ranks 1..N-1. The engine
core is handed the worker; the ranks build theirs here without climbing into ``engine/``."""
