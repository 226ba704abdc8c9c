"""Random paged-attention batches shared by the attention tests: scattered block tables, random
cache contents and queries, and the metadata the model runner would build for them."""

import torch

from stepserve.attention.base import AttentionMetadata


def make_batch(q_lens, ctx_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens)]
    width = max(-(-s // block_size) for s in seq_lens) + 1  # one padding column of null blocks
    needed = sum(-(-s // block_size) for s in seq_lens)
    num_blocks = needed + 8
    free = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()  # block 0 is the null block
    tables, slots, positions, qsl = [], [], [], [0]
    for s, q in zip(seq_lens, q_lens):
        own = [free.pop() for _ in range(-(-s // block_size))]
        tables.append(own + [0] * (width - len(own)))
        for p in range(s - q, s):
            positions.append(p)
            slots.append(own[p // block_size] * block_size + p % block_size)
        qsl.append(qsl[-1] + q)
    t = len(positions)
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
    q = torch.randn(t, num_heads, head_dim, generator=gen).to(dtype).to(device)
    k = torch.randn(t, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
    v = torch.randn(t, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    rows = list(range(len(q_lens)))
    decode = [r for r in rows if q_lens[r] == 1]
    prefill = [r for r in rows if q_lens[r] > 1]
    is_decode = not prefill
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=device),
        positions=torch.tensor(positions, device=device),
        query_start_loc=i32(qsl),
        seq_lens=i32(seq_lens),
        block_tables=i32(tables),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        block_size=block_size,
        is_decode=is_decode,
        decode_rows=None if is_decode or not decode else i32(decode),
        prefill_rows=None if is_decode else i32(prefill),
    )
    return q, k, v, cache, meta


def to_fp8_cache(k, v, cache, kv_scale):
    """The batch with an FP8 cache: ``cache`` quantized with the (K, V) scales, and ``k``, ``v``
    moved onto the FP8 grid (so storing them loses nothing). Returns k, v, the FP8 cache and the
    float64 cache it holds, dequantized, for the references."""
    from stepserve.attention.base import quantize_kv

    grid = lambda x, s: (quantize_kv(x, s).double() * s).to(x.dtype)  # noqa: E731
    k, v = grid(k, kv_scale[0]), grid(v, kv_scale[1])
    fp8 = torch.stack([quantize_kv(cache[0], kv_scale[0]), quantize_kv(cache[1], kv_scale[1])])
    exact = torch.stack([fp8[0].double() * kv_scale[0], fp8[1].double() * kv_scale[1]])
    return k, v, fp8, exact


def naive_attention(q, k, v, cache, meta, scale, window=0, softcap=0.0):
    """Each sequence alone: write its keys and values, then softmax(q K^T) V over its context
    (the last ``window`` keys when set, scores soft-capped when ``softcap`` is set)."""
    cache = cache.clone()
    slots = cache.shape[1] * cache.shape[2]
    cache[0].view(slots, *k.shape[1:])[meta.slot_mapping] = k
    cache[1].view(slots, *v.shape[1:])[meta.slot_mapping] = v
    group = q.shape[1] // k.shape[1]
    out = torch.full_like(q, float("nan"))
    qsl, bs = meta.query_start_loc.tolist(), meta.block_size
    for row, seq_len in enumerate(meta.seq_lens.tolist()):
        blocks = meta.block_tables[row, : -(-seq_len // bs)].long()
        keys = cache[0][blocks].reshape(-1, *k.shape[1:])[:seq_len].repeat_interleave(group, dim=1)
        values = cache[1][blocks].reshape(-1, *v.shape[1:])[:seq_len].repeat_interleave(group, dim=1)
        for token in range(qsl[row], qsl[row + 1]):
            pos = seq_len - (qsl[row + 1] - token)
            first = max(0, pos - window + 1) if window else 0  # the window holds `window` keys, itself included
            scores = torch.einsum("hd,khd->hk", q[token], keys[first : pos + 1]) * scale
            if softcap:
                scores = torch.tanh(scores / softcap) * softcap
            out[token] = torch.einsum("hk,khd->hd", scores.softmax(-1), values[first : pos + 1])
    return out
