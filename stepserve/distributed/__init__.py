"""Tensor parallelism within one host (``--tensor-parallel-size N``, ``-tp N``).

One process per rank: rank 0 is the engine core (or the in-process engine) and owns the one
scheduler; ranks 1..N-1 are subprocesses under it (``worker.py``). Each scheduler pass goes to
every rank over a socket; the forward's all-reduces go over ``torch.distributed``, NCCL between
GPUs and gloo between CPU processes, with the backend the only difference between the two.
If any rank dies, rank 0's core ends and the supervisor restarts the whole group (``ranks.py``).

What is split (``sharding.py``): q/k/v and gate/up by output rows (column-parallel), o and down by
input columns (row-parallel, then an all-reduce); KV heads split when the rank count divides
them, else each is replicated on the ranks that read it.

What is replicated, and why: the embedding, the LM head and the norms. Every rank then holds the
full logits of every row, so sampling, grammar masks, penalties and logprobs run unchanged and
identically on every rank, multi-step feeds each rank's own sampled tokens into its next step,
and no collective is spent on the vocabulary (a vocab-parallel head needs an all-gather of the
logits per step, and a vocab-parallel embedding an all-reduce) nor any vocabulary padding. The
cost is memory: each rank holds both tables (for Qwen2.5-14B, 2 x 152064 x 5120 bf16 = 3.1 GB per
GPU). Any vocabulary size works.
"""
