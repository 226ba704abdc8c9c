"""What the tasks other than text generation mean (embeddings, rerank/score, classification,
fill-mask, text2text): the task names and how a model's architecture picks one (``task``), what the
front reads about a task model (``spec``), the input checks (``inputs``) and the requests and
results the routes exchange with the one engine (``serving``). Chosen by ``--task`` or inferred
as KServe's Hugging Face server does; the routes are ``server/``'s, the model runners
``worker/``'s."""
