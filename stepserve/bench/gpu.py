"""GPU benchmark, end to end in one run: stepserve against transformers continuous batching.

    python -m stepserve.bench.gpu --out DIR

Random-weight bf16 models shaped like Llama-3.1-8B, Llama-3.2-1B, Qwen3-8B and Gemma-3-12B
(text) are built on the GPU (nothing is downloaded; a word-level tokenizer is written beside the
config, and requests are token ids). Workload: 256 requests of 512 random prompt tokens and 256 output tokens each,
``ignore_eos``. Measured: (a) stepserve offline throughput, (b) transformers ``generate_batch``
with ``paged|sdpa`` attention on the same weights and requests, (c) stepserve batch-1 decode
tok/s and the bandwidth it achieves against a measured device copy, (d) stepserve
``num_scheduler_steps`` 1 vs 8 on the 1B shape, (e) unless ``--skip-transformers``, that
stepserve's greedy tokens of its first requests and its teacher-forced logprobs of them are a
float32 reference's on the same weights, up to what bf16 moves transformers' own
(``greedy_check``). On request only (``--only trtllm``), the 8B shape in bf16, FP8 weights
and FP8 weights with an FP8 KV cache on TensorRT-LLM's fixed-length workloads
(``stepserve.bench.throughput.WORKLOADS``) beside its published FP8 figures. stepserve is timed through its engine loop
(schedule, execute, update) without detokenization, as vLLM's throughput benchmark does with
``detokenize=False``. A table goes to stdout, JSON to ``DIR/gpu_bench.json``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from stepserve.core.outputs import LoraRef

LLAMA = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    vocab_size=128256,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=131072,
    hidden_act="silu",
    bos_token_id=128000,
    eos_token_id=128001,
    torch_dtype="bfloat16",
    num_attention_heads=32,
    num_key_value_heads=8,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
GEMMA3_LAYERS = 48
# config.json of each shape: the published models' configs with their weights left out.
SHAPES = {
    "8b": dict(  # meta-llama/Llama-3.1-8B
        LLAMA,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        head_dim=128,
        tie_word_embeddings=False,
        rope_scaling=LLAMA3_ROPE | {"factor": 8.0},
    ),
    "70b": dict(  # meta-llama/Llama-3.1-70B (the multi-GPU bench, gpu_tp.py)
        LLAMA,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
        rope_scaling=LLAMA3_ROPE | {"factor": 8.0},
    ),
    "1b": dict(  # meta-llama/Llama-3.2-1B
        LLAMA,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        head_dim=64,
        tie_word_embeddings=True,
        rope_scaling=LLAMA3_ROPE | {"factor": 32.0},
    ),
    "qwen3-8b": dict(  # Qwen/Qwen3-8B
        architectures=["Qwen3ForCausalLM"],
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        attention_bias=False,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=40960,
        hidden_act="silu",
        tie_word_embeddings=False,
        bos_token_id=151643,
        eos_token_id=151645,
        torch_dtype="bfloat16",
    ),
    "gemma3-12b": dict(  # google/gemma-3-12b-it's text config
        architectures=["Gemma3ForCausalLM"],
        model_type="gemma3_text",
        vocab_size=262208,
        hidden_size=3840,
        intermediate_size=15360,
        num_hidden_layers=GEMMA3_LAYERS,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        query_pre_attn_scalar=256,
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        sliding_window=1024,
        layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(GEMMA3_LAYERS)],
        rope_theta=1000000.0,
        rope_local_base_freq=10000.0,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=1,
        torch_dtype="bfloat16",
    ),
    "qwen3-30b-a3b": dict(  # Qwen/Qwen3-30B-A3B: 128 experts of width 768, 8 a token (gpu_moe.py runs it)
        architectures=["Qwen3MoeForCausalLM"],
        model_type="qwen3_moe",
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        attention_bias=False,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=40960,
        hidden_act="silu",
        tie_word_embeddings=False,
        bos_token_id=151643,
        eos_token_id=151645,
        torch_dtype="bfloat16",
    ),
}
NUM_REQUESTS, PROMPT_LEN, OUTPUT_LEN = 256, 512, 256
ASYNC_SCHEDULING = [True]  # --no-async-scheduling sets it False for every stepserve engine
MAX_MODEL_LEN = 1024


# -- models ------------------------------------------------------------------------------


def model_dir_name(shape: str) -> str:
    return f"llama-{shape}-random" if SHAPES[shape]["model_type"] == "llama" else f"{shape}-random"


def write_model_dir(root: Path, shape: str) -> Path:
    """config.json, generation_config.json and a word-level tokenizer covering the vocabulary."""
    from stepserve.bench.gpu_serve import write_vocab_tokenizer

    config = SHAPES[shape]
    directory = root / model_dir_name(shape)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": config["eos_token_id"]}))
    write_vocab_tokenizer(directory, config["vocab_size"], config["bos_token_id"], config["eos_token_id"])
    return directory


_WEIGHT_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {}


def weight_shapes(shape: str) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names and shapes: transformers' model of the config on the meta device
    (tied weights appear once, under the embedding's name)."""
    if shape not in _WEIGHT_SHAPES:
        from transformers import AutoConfig, AutoModelForCausalLM

        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp)
            (directory / "config.json").write_text(json.dumps(SHAPES[shape]))
            config = AutoConfig.from_pretrained(directory)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        _WEIGHT_SHAPES[shape] = {name: tuple(p.shape) for name, p in model.named_parameters()}
    return _WEIGHT_SHAPES[shape]


def random_weights(shape: str, seed: int = 0):
    """The same ``(hf_name, bf16 tensor on the GPU)`` stream every time: N(0, 0.02), and norms
    that scale by 1: weights of 1, or 0 for Gemma, whose norms scale by ``1 + w`` (transformers
    initializes them so too). Gemma norms of 1 doubled every normed activation and q and k (scores
    x4): on 8 layers of Gemma-3 heads (CPU, float32 against bfloat16 in transformers alone) bf16's
    argmax then differed from float32's at 25% of positions, against none with norms of 0, so no
    greedy check could pass on such a model."""
    gen = torch.Generator(device="cuda")
    unit = 0.0 if SHAPES[shape]["model_type"].startswith("gemma") else 1.0
    for k, (name, dims) in enumerate(weight_shapes(shape).items()):
        if len(dims) == 1:
            yield name, torch.full(dims, unit, dtype=torch.bfloat16, device="cuda")
            continue
        gen.manual_seed(seed * 100003 + k)
        yield name, (torch.randn(dims, generator=gen, device="cuda", dtype=torch.float32) * 0.02).to(torch.bfloat16)


def free_gpu() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


# -- workload ----------------------------------------------------------------------------


def workload(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 128000) for _ in range(PROMPT_LEN)] for _ in range(NUM_REQUESTS)]


def stepserve_engine(model_dir: Path, shape: str, steps: int, **options):
    from stepserve.config import EngineConfig
    from stepserve.engine.builder import build_engine

    options.setdefault("async_scheduling", ASYNC_SCHEDULING[0])
    options.setdefault("gpu_memory_utilization", 0.9)
    options.setdefault("max_model_len", MAX_MODEL_LEN)
    options.setdefault("max_num_seqs", 256)
    config = EngineConfig.from_kwargs(
        model=str(model_dir),
        num_scheduler_steps=steps,
        max_num_batched_tokens=8192,
        **options,
    )
    core, _, info = build_engine(config, weights=random_weights(shape))
    return core, info


def run_requests(
    core,
    prompts: list[list[int]],
    max_tokens: int,
    tag: str,
    passes: list | None = None,
    outputs: dict | None = None,
    sampling: dict | None = None,
    loras: list | None = None,
) -> tuple[float, int]:
    """Seconds and output tokens for the prompts run through the engine loop to completion.
    ``passes`` collects (requests, steps, tokens computed by the first step, seconds) per pass:
    each step applies one pass after its one host sync (with asynchronous scheduling, the
    next pass is already running then), so wall time per step is that pass's cost. ``outputs``
    collects each request's generated token ids under its index in ``prompts``. ``sampling``:
    SamplingParams fields (default greedy). ``loras``: LoRA adapters (``LoraRef``, or None for the
    base) given out in turn: request i runs with ``loras[i % len(loras)]``."""
    from stepserve.core.outputs import EngineCoreRequest
    from stepserve.sampling import SamplingParams

    params = SamplingParams(**{"temperature": 0.0, **(sampling or {})}, max_tokens=max_tokens, ignore_eos=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i, ids in enumerate(prompts):
        lora = loras[i % len(loras)] if loras else None
        core.add_request(EngineCoreRequest(f"{tag}-{i}", tuple(ids), params, time.monotonic(), lora=lora))
    tokens = 0
    while core.has_unfinished:
        t0 = time.perf_counter()
        outs = core.step()
        sched, core.last_pass = core.last_pass, None  # the pass this step applied (one a step)
        if passes is not None and sched is not None:
            passes.append((len(sched.requests), sched.num_steps, sched.num_batched_tokens, time.perf_counter() - t0))
        for out in outs:
            tokens += len(out.new_token_ids)
            if outputs is not None:
                outputs.setdefault(int(out.request_id.rsplit("-", 1)[1]), []).extend(out.new_token_ids)
            if out.error:
                raise RuntimeError(f"request {out.request_id} failed: {out.error}")
    torch.cuda.synchronize()
    return time.perf_counter() - start, tokens


def pass_breakdown(passes: list) -> dict:
    """Time in passes that compute prompt tokens vs pure decode passes."""
    prefill = [p for p in passes if p[2] > p[0]]
    decode = [p for p in passes if p[2] == p[0]]
    decode_steps = sum(p[1] for p in decode)
    return {
        "prefill_passes": len(prefill),
        "prefill_s": round(sum(p[3] for p in prefill), 3),
        "prefill_tokens": sum(p[2] for p in prefill),
        "decode_passes": len(decode),
        "decode_steps": decode_steps,
        "decode_s": round(sum(p[3] for p in decode), 3),
        "decode_ms_per_step": round(1e3 * sum(p[3] for p in decode) / max(1, decode_steps), 3),
        "decode_ms_per_step_full_batch": round(
            1e3 * statistics.median([p[3] / p[1] for p in decode if p[0] == max(q[0] for q in decode)] or [0]), 3
        ),
    }


def runner_of(core):
    """The engine's model runner: its worker, or rank 0's runner under tensor parallelism."""
    return getattr(core.worker, "runner", core.worker)


def graph_step_ms(core, size: int) -> float | None:
    """GPU time of one captured decode step at ``size`` rows (contexts as the last pass left them);
    None under tensor parallelism, where one rank's graph alone would wait on the others' all-reduce."""
    if runner_of(core) is not core.worker:
        return None
    graphs = core.worker.graphs
    if graphs is None or size not in graphs.graphs:
        return None
    graphs.batch, graphs.size = size, size
    graphs.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(10):
        graphs.replay()
    b.record()
    b.synchronize()
    return round(a.elapsed_time(b) / 10, 3)


def stepserve_throughput(
    core,
    prompts,
    warm: bool = True,
    outputs: dict | None = None,
    sampling: dict | None = None,
    loras: list | None = None,
) -> dict:
    # Warm-up on the workload's own shapes: Triton compiles a kernel per specialization (mixed
    # prefill+decode steps, split or not), which must not land inside the timed run.
    # Its prompts are drawn apart from the timed ones, so the prefix cache cannot serve them.
    if warm:
        run_requests(core, workload(seed=1)[:64], 4, "warm", loras=loras)
    passes: list = []
    elapsed, tokens = run_requests(core, prompts, OUTPUT_LEN, "bench", passes, outputs, sampling, loras)
    return {
        "elapsed_s": round(elapsed, 3),
        "output_tokens": tokens,
        "out_tok_s": round(tokens / elapsed, 1),
        **pass_breakdown(passes),
        "graph_step_ms_256": graph_step_ms(core, 256),
    }


def profile(core, prompts, out: Path) -> None:
    """Kernel time by name over all prefills and one 8-step decode pass of the batch."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_requests(core, prompts, 9, "prof")
    text = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
    (out / "profile_8b.txt").write_text(text)
    print(text, flush=True)


def decode_busy_share(
    core, prompts, passes: int = 6, kernels: list | None = None, trace: Path | None = None, loras: list | None = None
) -> dict:
    """Steady full-batch decode: wall time of ``passes`` steps against the kernel time the
    profiler records in them (CUDA activity only, so the host is not slowed): the share of the
    time the GPU is busy, and what a step costs. ``kernels`` receives the profiler's per-kernel
    averages; with ``trace``, the Chrome trace is written there (gzipped) and the result's
    ``gaps`` says where the GPU waited (``trace_gaps``). ``loras``: as ``run_requests``'s."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from stepserve.core.outputs import EngineCoreRequest
    from stepserve.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=8 * (passes + 4), ignore_eos=True)
    for i, ids in enumerate(prompts):
        lora = loras[i % len(loras)] if loras else None
        core.add_request(EngineCoreRequest(f"busy-{i}", tuple(ids), params, time.monotonic(), lora=lora))
    sched = core.scheduler
    while sched.waiting or any(r.num_tokens - r.num_computed_tokens > 1 for r in sched.running):
        core.step()  # prefill until every request decodes
    for _ in range(2):
        core.step()
    batch = len(sched.running)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        steps = 0
        for _ in range(passes):
            core.step()
            steps += core.last_pass.num_steps if core.last_pass is not None else 0
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    while core.has_unfinished:
        core.step()
    averages = prof.key_averages()
    if kernels is not None:
        kernels.extend(averages)
    gaps = _trace_gaps(prof, trace) if trace is not None else None
    busy = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in averages) / 1e6
    return {
        **({"gaps": gaps} if gaps is not None else {}),
        "passes": passes,
        "steps": steps,
        "batch": batch,
        "wall_s": round(wall, 4),
        "kernel_s": round(busy, 4),
        "busy_share": round(busy / wall, 3),
        "ms_per_step": round(1e3 * wall / max(1, steps), 3),
    }


def _trace_gaps(prof, path: Path) -> dict:
    """Write the profiler's Chrome trace to ``path`` (gzipped) and summarise its idle gaps."""
    import gzip
    import shutil

    from stepserve.bench.trace_gaps import device_activities, gap_summary, read_trace

    raw = path.with_suffix("")  # trace.json.gz -> trace.json, written then compressed
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as src, gzip.open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    return gap_summary(device_activities(read_trace(path)))


def batch1_decode(
    core, prompt: list[int], weight_bytes: int, kv_bytes_per_token: int, lora: LoraRef | None = None
) -> dict:
    """Decode tok/s of one request (with the adapter ``lora``, if given): (t(1 + n tokens) -
    t(1 token)) over n, best of three."""
    n, loras = OUTPUT_LEN, [lora]
    run_requests(core, [prompt], n + 1, "b1warm", loras=loras)
    first = min(run_requests(core, [prompt], 1, f"b1p{i}", loras=loras)[0] for i in range(3))
    full = min(run_requests(core, [prompt], n + 1, f"b1f{i}", loras=loras)[0] for i in range(3))
    tok_s = n / (full - first)
    mean_context = len(prompt) + n / 2
    bytes_per_token = weight_bytes + kv_bytes_per_token * mean_context
    return {
        "tok_s": round(tok_s, 1),
        "bytes_per_token": bytes_per_token,
        "achieved_tb_s": round(bytes_per_token * tok_s / 1e12, 3),
    }


def model_stream_bytes(core) -> tuple[int, int]:
    """Bytes a decode step must read: every weight but the embedding table (one row is read;
    tied models read it whole as the LM head), and KV bytes per context token. Under tensor
    parallelism, rank 0's: its shards and replicas, its KV heads."""
    model = runner_of(core).model
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.embed_tokens.weight
    if model.lm_head is not None:
        total -= embed.numel() * embed.element_size()
    cfg = model.cfg
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * embed.element_size()
    return total, kv


# -- transformers --------------------------------------------------------------------------

GREEDY_CHECK_REQUESTS = 4  # requests whose every greedy token is checked against a float32 reference
# The greedy check's bound (greedy_verdict): stepserve's logprobs may stray from float32's up to
# NOISE_FACTOR times as far as transformers' own bf16 ones do, plus NOISE_FLOOR nats (a bound of
# zero noise would fail on float32 rounding alone).
NOISE_FACTOR = 2.0
NOISE_FLOOR = 1e-3


def hf_model(model_dir: Path, shape: str, attn: str, dtype: torch.dtype = torch.bfloat16):
    """transformers' model of ``model_dir`` on the GPU in ``dtype``, holding ``random_weights(shape)``
    (bf16 values, which float32 holds exactly)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("cuda"):
        try:
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
        except TypeError:
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, torch_dtype=dtype)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in random_weights(shape):  # the same weights stepserve runs
            params[name].copy_(tensor)
    return model.eval()


def teacher_forced_logprobs(core, prompts, outputs: dict) -> dict[int, list]:
    """stepserve's own teacher-forced logprobs of its greedy tokens, from the live engine: request i
    (of the first GREEDY_CHECK_REQUESTS) sent again as prompt + ``outputs[i]`` with prompt
    logprobs, whose position p gives token p + 1's ``TokenLogprob``. Kept: the positions from
    ``len(prompt) - 1`` on, one per output token. Such requests skip the prefix cache."""
    from stepserve.core.outputs import EngineCoreRequest
    from stepserve.sampling import MAX_LOGPROBS, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, prompt_logprobs=MAX_LOGPROBS)
    count = min(GREEDY_CHECK_REQUESTS, len(prompts))
    for i in range(count):
        ids = tuple(prompts[i]) + tuple(outputs[i])
        core.add_request(EngineCoreRequest(f"forced-{i}", ids, params, time.monotonic()))
    found: dict[int, list] = {}
    while core.has_unfinished:
        for out in core.step():
            if out.error:
                raise RuntimeError(f"request {out.request_id} failed: {out.error}")
            if out.prompt_logprobs is not None:
                i = int(out.request_id.rsplit("-", 1)[1])
                found[i] = list(out.prompt_logprobs[len(prompts[i]) - 1 :])
    for i in range(count):
        if [lp.token_id for lp in found.get(i, ())] != list(outputs[i]):
            raise RuntimeError(f"teacher-forced request {i}: its prompt logprobs are not those of its outputs")
    return found


def _p99(x: torch.Tensor) -> float:
    return torch.quantile(x.double(), 0.99).item()


def _locate(row: int, lengths: list[int]) -> tuple[int, int]:
    """(request, position in it) of a row of requests laid end to end."""
    for request, length in enumerate(lengths):
        if row < length:
            return request, row
        row -= length
    raise IndexError(row)


def greedy_verdict(
    ref: torch.Tensor,
    hf: torch.Tensor,
    tokens: torch.Tensor,
    logprobs: torch.Tensor,
    lengths: list[int] | None = None,
) -> dict:
    """The greedy check's arithmetic on plain tensors: are stepserve's greedy tokens and
    teacher-forced logprobs float32's, up to what bf16 arithmetic alone moves?

    ``ref`` [T, V]: log_softmax of transformers in float32 holding the bf16 weights; ``hf`` [T, V]:
    the same from transformers in bf16; ``tokens`` [T]: stepserve's greedy tokens; ``logprobs``
    [T]: stepserve's teacher-forced logprob of each; ``lengths``: rows per request, laid end to
    end (default: one request), to name where the first real difference is.

    At stepserve's token, noise = |hf - ref| (bf16 in transformers) and err = |logprobs - ref|
    (stepserve). Within noise: err's 99th percentile and maximum at most NOISE_FACTOR times
    noise's, plus NOISE_FLOOR. Where the token is not float32's argmax, it falls ``gap`` below it:
    a tie when gap <= NOISE_FACTOR x max noise (bf16 rounding could have flipped it), else a real
    difference. ``passed``: within noise and no real difference.
    """
    lengths = [len(tokens)] if lengths is None else list(lengths)
    if ref.shape != hf.shape or not ref.shape[0] == len(tokens) == len(logprobs) == sum(lengths):
        raise ValueError(
            f"greedy_verdict: ref {tuple(ref.shape)}, hf {tuple(hf.shape)}, {len(tokens)} tokens, "
            f"{len(logprobs)} logprobs and lengths summing to {sum(lengths)} must agree on the rows"
        )
    ref, hf = ref.float(), hf.float()
    tokens = tokens.to(ref.device, torch.long)
    rows = torch.arange(len(tokens), device=ref.device)
    ref_tok = ref[rows, tokens]
    noise = (hf[rows, tokens] - ref_tok).abs()
    err = (logprobs.to(ref.device, torch.float32) - ref_tok).abs()
    noise_p99, noise_max, err_p99, err_max = _p99(noise), noise.max().item(), _p99(err), err.max().item()
    bound_p99, bound_max = NOISE_FACTOR * noise_p99 + NOISE_FLOOR, NOISE_FACTOR * noise_max + NOISE_FLOOR
    within_noise = err_p99 <= bound_p99 and err_max <= bound_max
    top, top_ids = ref.max(dim=-1)
    gap = top - ref_tok  # 0 where stepserve's token is float32's argmax
    off = tokens != top_ids
    real = off & (gap > NOISE_FACTOR * noise_max)
    first = None
    if real.any():
        row = int(real.nonzero()[0, 0])
        request, position = _locate(row, lengths)
        first = {
            "request": request,
            "position": position,
            "token": int(tokens[row]),
            "fp32_argmax": int(top_ids[row]),
            "gap": round(gap[row].item(), 5),
        }
    share = lambda mask: round(mask.float().mean().item(), 4)  # noqa: E731
    return {
        "passed": within_noise and first is None,
        "within_noise": within_noise,
        "tokens": len(tokens),
        "exact_argmax_share": share(tokens == hf.argmax(dim=-1)),  # against transformers bf16
        "exact_vs_fp32_share": share(~off),
        "hf_bf16_vs_fp32_share": share(hf.argmax(dim=-1) == top_ids),  # 1 - bf16's own flip rate
        "ties": int((off & ~real).sum()),
        "real_differences": int(real.sum()),
        "first_real_difference": first,
        "max_gap": round(gap.max().item(), 5),
        "noise_p99": round(noise_p99, 6),
        "noise_max": round(noise_max, 6),
        "err_p99": round(err_p99, 6),
        "err_max": round(err_max, 6),
        "err_p99_bound": round(bound_p99, 6),
        "err_max_bound": round(bound_max, 6),
    }


@torch.no_grad()
def hf_logprobs(model_dir: Path, shape: str, dtype: torch.dtype, attn: str, seqs, starts) -> torch.Tensor:
    """log_softmax of transformers' logits (float32, on the host) at each sequence's positions
    from its start on, rows end to end. One model on the GPU at a time, freed after: a 12B
    shape's float32 copy (48 GB) never sits beside its bf16 one."""
    model = hf_model(model_dir, shape, attn, dtype)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # a float32 reference, not TF32's 10-bit mantissa
    try:
        rows = [
            model(torch.tensor([seq], device="cuda")).logits[0, start:].float().log_softmax(dim=-1).cpu()
            for seq, start in zip(seqs, starts)
        ]
    finally:
        torch.set_float32_matmul_precision(precision)
    del model
    free_gpu()
    return torch.cat(rows)


def greedy_check(model_dir: Path, shape: str, prompts, outputs: dict, logprobs: dict) -> dict:
    """Are stepserve's greedy tokens and teacher-forced logprobs (``teacher_forced_logprobs``)
    those of a float32 reference, up to bf16 noise? (``greedy_verdict`` says how.)

    Teacher-forced on the same inputs, prompt + stepserve's tokens of the first requests:
    transformers in float32 holding the bf16 weights (eager attention) is the reference,
    transformers in bf16 (SDPA) measures how far bf16 arithmetic alone moves a logprob. The
    result says ``passed``, counts ties and real differences and names the first real one (the
    timings are kept either way); missing outputs or logprobs raise.
    """
    count = GREEDY_CHECK_REQUESTS
    for i in range(count):
        ids, lps = outputs.get(i), logprobs.get(i)
        if not ids or len(ids) != OUTPUT_LEN:
            raise RuntimeError(f"greedy check: request {i} produced {len(ids or [])} tokens, not {OUTPUT_LEN}")
        if not lps or len(lps) != OUTPUT_LEN:
            raise RuntimeError(f"greedy check: request {i} has {len(lps or [])} teacher-forced logprobs")
    seqs = [prompts[i] + outputs[i][:-1] for i in range(count)]  # position len(prompt) - 1 chose output 0
    starts = [len(prompts[i]) - 1 for i in range(count)]
    ref = hf_logprobs(model_dir, shape, torch.float32, "eager", seqs, starts)
    hf = hf_logprobs(model_dir, shape, torch.bfloat16, "sdpa", seqs, starts)
    entries = [lp for i in range(count) for lp in logprobs[i]]
    tokens = torch.tensor([t for i in range(count) for t in outputs[i]])
    ours = torch.tensor([lp.logprob for lp in entries])
    verdict = greedy_verdict(ref, hf, tokens, ours, [OUTPUT_LEN] * count)
    # Where stepserve's prefill, teacher-forced, ranks first the token its decode chose.
    prefill_agrees = sum(lp.rank == 1 for lp in entries) / len(entries)
    return {"requests": count, **verdict, "stepserve_prefill_argmax_share": round(prefill_agrees, 4)}


def transformers_cb(model_dir: Path, shape: str, prompts) -> dict:
    import transformers
    from transformers import GenerationConfig

    model = hf_model(model_dir, shape, "paged|sdpa")
    gen = GenerationConfig(
        max_new_tokens=OUTPUT_LEN,
        do_sample=False,
        eos_token_id=SHAPES[shape]["eos_token_id"],
        pad_token_id=0,
    )
    model.generate_batch(
        inputs=[p[:64] for p in prompts[:16]],
        generation_config=GenerationConfig(max_new_tokens=16, do_sample=False, pad_token_id=0),
    )
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = model.generate_batch(inputs=prompts, generation_config=gen)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.generated_tokens) for o in outputs.values())
    moe = SHAPES[shape].get("num_experts")
    experts = getattr(model.config, "_experts_implementation", None) if moe else None  # grouped_mm or eager
    del model
    free_gpu()
    return {
        "elapsed_s": round(elapsed, 3),
        "output_tokens": tokens,
        "out_tok_s": round(tokens / elapsed, 1),
        "version": transformers.__version__,
        **({"experts_implementation": experts} if experts else {}),
    }


# -- device ------------------------------------------------------------------------------


def copy_bandwidth() -> float:
    """TB/s of a 4 GiB device-to-device copy, counting bytes read plus written (median of 20)."""
    src = torch.randn(2**30, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    free_gpu()
    return 2 * 4 * 2**30 / statistics.median(times) / 1e12


# -- the run -------------------------------------------------------------------------------


def bench_1b(root: Path, prompts, results: dict, outputs: dict, logprobs: dict | None = None) -> None:
    """The 1B shape at N=1 and N=8; the N=8 engine fills ``outputs`` and, if given, ``logprobs``
    (``teacher_forced_logprobs``)."""
    model_dir = write_model_dir(root, "1b")
    for steps in (1, 8):
        core, info = stepserve_engine(model_dir, "1b", steps)
        results[f"stepserve_1b_n{steps}"] = {
            **stepserve_throughput(core, prompts, outputs=outputs if steps == 8 else None),
            "kv_blocks": info.num_kv_blocks,
        }
        print(f"1b stepserve N={steps}: {results[f'stepserve_1b_n{steps}']}", flush=True)
        if steps == 8 and logprobs is not None:
            logprobs.update(teacher_forced_logprobs(core, prompts, outputs))
        del core
        free_gpu()


def bench_8b(
    root: Path,
    prompts,
    results: dict,
    copy_tb_s: float,
    profile_dir: Path | None,
    outputs: dict,
    logprobs: dict | None = None,
) -> None:
    model_dir = write_model_dir(root, "8b")
    core, info = stepserve_engine(model_dir, "8b", 8, compilation_cache_dir=str(root / "compile"))
    results["stepserve_8b"] = {
        **stepserve_throughput(core, prompts, outputs=outputs),
        "kv_blocks": info.num_kv_blocks,
        "load_s": round(info.load_seconds, 1),
    }
    results["stepserve_8b"]["async_scheduling"] = core.async_scheduling
    print(f"8b stepserve N=8: {results['stepserve_8b']}", flush=True)
    if core.async_scheduling:  # the same engine and prompts with the synchronous loop
        results["stepserve_8b_sync"] = sync_comparison(core, prompts, outputs)
        print(f"8b stepserve N=8, synchronous scheduling: {results['stepserve_8b_sync']}", flush=True)
    busy_prompts = workload(seed=3)[: len(prompts)]
    results["decode_busy_8b"] = decode_busy_share(core, busy_prompts)
    core.async_scheduling = False
    results["decode_busy_8b_sync"] = decode_busy_share(core, workload(seed=4)[: len(prompts)])
    core.async_scheduling = ASYNC_SCHEDULING[0]
    print(
        f"8b steady decode, GPU busy: {results['decode_busy_8b']} (synchronous: {results['decode_busy_8b_sync']})",
        flush=True,
    )
    weight_bytes, kv_bytes = model_stream_bytes(core)
    b1 = batch1_decode(core, prompts[0], weight_bytes, kv_bytes)
    b1["share_of_copy_bandwidth"] = round(b1["achieved_tb_s"] / copy_tb_s, 3)
    results["batch1_8b"] = b1
    print(f"8b batch-1: {b1}", flush=True)
    if profile_dir is not None:
        profile(core, prompts, profile_dir)
    bench_sampled(core, results, len(prompts))
    if logprobs is not None:  # last, so that a failure here costs none of the timings
        logprobs.update(teacher_forced_logprobs(core, prompts, outputs))
    del core
    free_gpu()


SAMPLED = {
    "top_p": dict(temperature=0.8, top_p=0.95),  # sort-free (triton_sampling.filtered_race)
    "temperature": dict(temperature=0.8),
    "top_k_top_p": dict(temperature=0.6, top_k=20, top_p=0.95),  # Qwen3's defaults, both on one row
}


def bench_sampled(core, results: dict, count: int) -> None:
    """The workload sampled instead of greedy (fresh prompts each run, so the prefix cache serves
    none): top-p, temperature alone, and top-k with top-p inside the sampling graphs, then top-p
    drawn eagerly from the graphs' logits, as before the sampling graphs."""
    for i, (name, fields) in enumerate(SAMPLED.items()):
        prompts = workload(seed=10 + i)[:count]
        results[f"sampled_8b_{name}"] = stepserve_throughput(core, prompts, warm=False, sampling=fields)
        print(f"8b sampled ({name}), in the graphs: {results[f'sampled_8b_{name}']}", flush=True)
    graphs = core.worker.graphs
    if graphs is not None:
        graphs.sampling_graphs.clear()  # the runner then samples eagerly; only the greedy check's requests follow
        results["sampled_8b_top_p_eager"] = stepserve_throughput(
            core, workload(seed=20)[:count], warm=False, sampling=SAMPLED["top_p"]
        )
        print(f"8b sampled (top_p), eagerly: {results['sampled_8b_top_p_eager']}", flush=True)


def sync_comparison(core, prompts, async_outputs: dict) -> dict:
    """The timed run again with the synchronous loop (prefix cache off, so that the same prompts
    are computed again), and how many requests got the asynchronous run's tokens exactly."""
    blocks = core.scheduler.blocks
    core.async_scheduling, blocks.enable_prefix_caching = False, False
    try:
        outputs: dict = {}
        result = stepserve_throughput(core, prompts, warm=False, outputs=outputs)
    finally:
        core.async_scheduling, blocks.enable_prefix_caching = True, True
    same = sum(outputs.get(i) == async_outputs.get(i) for i in range(len(prompts)))
    first = [
        next((t for t, (a, b) in enumerate(zip(outputs[i], async_outputs[i])) if a != b), None)
        for i in range(len(prompts))
    ]
    diverged = [t for t in first if t is not None]
    result.update(
        requests_identical_to_async=same,
        requests=len(prompts),
        first_divergence_median=statistics.median(diverged) if diverged else None,
    )
    return result


def bench_family(root: Path, shape: str, prompts, results: dict, outputs: dict, logprobs: dict | None = None) -> None:
    """Another family's shape (Qwen3-8B, Gemma-3-12B): stepserve N=8, nothing else (but the
    teacher-forced logprobs of the greedy check, when ``logprobs`` is given)."""
    core, info = stepserve_engine(write_model_dir(root, shape), shape, 8, compilation_cache_dir=str(root / "compile"))
    results[f"stepserve_{shape}"] = {
        **stepserve_throughput(core, prompts, outputs=outputs),
        "kv_blocks": info.num_kv_blocks,
        "load_s": round(info.load_seconds, 1),
    }
    print(f"{shape} stepserve N=8: {results[f'stepserve_{shape}']}", flush=True)
    if logprobs is not None:
        logprobs.update(teacher_forced_logprobs(core, prompts, outputs))
    del core
    free_gpu()


def bench_transformers(
    root: Path, shape: str, prompts, results: dict, outputs: dict, logprobs: dict, skip_cb: bool = False
) -> None:
    """The greedy check of stepserve's tokens, then transformers continuous batching."""
    model_dir = write_model_dir(root, shape)
    results[f"greedy_check_{shape}"] = greedy_check(model_dir, shape, prompts, outputs, logprobs)
    print(f"{shape} greedy check: {results[f'greedy_check_{shape}']}", flush=True)
    if skip_cb:
        return
    results[f"transformers_{shape}"] = transformers_cb(model_dir, shape, prompts)
    print(f"{shape} transformers: {results[f'transformers_{shape}']}", flush=True)


def bench_fp8(root: Path, prompts, results: dict, copy_tb_s: float) -> None:
    """The 8B shape with ``quantization="fp8"``: weights quantized at load from the same bf16."""
    model_dir = write_model_dir(root, "8b")
    core, info = stepserve_engine(model_dir, "8b", 8, quantization="fp8", compilation_cache_dir=str(root / "compile"))
    results["fp8_8b"] = {
        **stepserve_throughput(core, prompts),
        "kv_blocks": info.num_kv_blocks,
        "load_s": round(info.load_seconds, 1),
    }
    print(f"8b fp8: {results['fp8_8b']}", flush=True)
    weight_bytes, kv_bytes = model_stream_bytes(core)
    b1 = batch1_decode(core, prompts[0], weight_bytes, kv_bytes)
    b1["share_of_copy_bandwidth"] = round(b1["achieved_tb_s"] / copy_tb_s, 3)
    results["fp8_batch1_8b"] = b1
    print(f"8b fp8 batch-1: {b1}", flush=True)
    del core
    free_gpu()


def bench_fp8_kv(root: Path, prompts, results: dict, copy_tb_s: float) -> None:
    """The 8B shape, bf16 weights, with ``kv_cache_dtype="fp8"`` (e4m3 pages, scale 1.0)."""
    core, info = stepserve_engine(
        write_model_dir(root, "8b"), "8b", 8, kv_cache_dtype="fp8", compilation_cache_dir=str(root / "compile")
    )
    results["fp8_kv_8b"] = {
        **stepserve_throughput(core, prompts),
        "kv_blocks": info.num_kv_blocks,
        "load_s": round(info.load_seconds, 1),
    }
    print(f"8b fp8 KV cache: {results['fp8_kv_8b']}", flush=True)
    weight_bytes, kv_bytes = model_stream_bytes(core)
    b1 = batch1_decode(core, prompts[0], weight_bytes, kv_bytes // 2)
    b1["share_of_copy_bandwidth"] = round(b1["achieved_tb_s"] / copy_tb_s, 3)
    results["fp8_kv_batch1_8b"] = b1
    print(f"8b fp8 KV cache batch-1: {b1}", flush=True)
    del core
    free_gpu()


# Output tok/s of Llama 3.1 8B FP8 on one GPU in TensorRT-LLM's performance overview, by card.
TRTLLM_FP8_OUT_TOK_S = {
    "H100": {
        "trtllm-128-128": 28312,
        "trtllm-500-2000": 17660,
        "trtllm-1000-1000": 15220,
        "trtllm-2048-128": 3450,
        "trtllm-5000-500": 3459,
    },
    "H200": {
        "trtllm-128-128": 27911,
        "trtllm-500-2000": 20770,
        "trtllm-1000-1000": 17744,
        "trtllm-2048-128": 3538,
        "trtllm-5000-500": 3902,
    },
}
# Engine options of each precision. NVIDIA's FP8 checkpoints that the published figures ran
# (ModelOpt) quantize the KV cache to FP8 as well: ``fp8kv`` is that setting, ``fp8`` weights only.
TRTLLM_PRECISIONS = {
    "bf16": {},
    "fp8": {"quantization": "fp8"},
    "fp8kv": {"quantization": "fp8", "kv_cache_dtype": "fp8"},
}
TRTLLM_MAX_MODEL_LEN = 5504  # the longest workload, 5000 in + 500 out, in whole 16-token KV blocks


def trtllm_card() -> str | None:
    """This GPU's row of TRTLLM_FP8_OUT_TOK_S, or None for another card."""
    name = torch.cuda.get_device_name()
    return next((card for card in TRTLLM_FP8_OUT_TOK_S if card in name), None)


def fixed_prompts(count: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 128000) for _ in range(length)] for _ in range(count)]


def bench_trtllm(
    root: Path, precision: str, name: str, scale: float, results: dict, profile_dir: Path | None = None
) -> None:
    """One of TensorRT-LLM's workloads on the 8B shape, on an engine of its own (the workload
    sets max_num_seqs), with ``scale`` times its requests; FP8 is set beside the published figure.
    With ``profile_dir``, then steady decode at the workload's concurrency under the profiler
    (``trtllm_profile``)."""
    from stepserve.bench.throughput import WORKLOADS

    w = WORKLOADS[name]
    count = max(1, round(w.num_prompts * scale))
    core, info = stepserve_engine(
        write_model_dir(root, "8b"),
        "8b",
        8,
        max_model_len=TRTLLM_MAX_MODEL_LEN,
        max_num_seqs=w.max_num_seqs,
        compilation_cache_dir=str(root / "compile"),
        **TRTLLM_PRECISIONS[precision],
    )
    # Warm-up on the workload's prompt length (see stepserve_throughput), with other prompts.
    run_requests(core, fixed_prompts(min(count, 32), w.input_len, seed=1), 4, "warm")
    elapsed, tokens = run_requests(core, fixed_prompts(count, w.input_len, seed=0), w.output_len, "trtllm")
    card = trtllm_card()
    theirs = TRTLLM_FP8_OUT_TOK_S[card][name] if card else None
    entry = {
        "input_len": w.input_len,
        "output_len": w.output_len,
        "requests": count,
        "max_num_seqs": w.max_num_seqs,
        "elapsed_s": round(elapsed, 3),
        "output_tokens": tokens,
        "out_tok_s": round(tokens / elapsed, 1),
        "kv_blocks": info.num_kv_blocks,
        "load_s": round(info.load_seconds, 1),
        "trtllm_fp8_out_tok_s": theirs,
    }
    if precision != "bf16":
        entry["over_trtllm_fp8"] = _ratio(entry["out_tok_s"], theirs)
    results.setdefault("trtllm", {}).setdefault(precision, {})[name] = entry
    print(
        f"8b {precision} {name}: {count} requests, max_num_seqs {w.max_num_seqs}: {entry['out_tok_s']} output tok/s "
        f"(TensorRT-LLM FP8 on {card}: {theirs}; ours/theirs {entry.get('over_trtllm_fp8', '-')})",
        flush=True,
    )
    if profile_dir is not None:
        entry["decode_profile"] = trtllm_profile(core, info, w, profile_dir / f"profile_trtllm_{precision}_{name}.txt")
        print(f"8b {precision} {name} steady decode: {entry['decode_profile']}", flush=True)
    del core
    free_gpu()


def trtllm_profile(core, info, w, path: Path, passes: int = 4) -> dict:
    """Steady decode of one workload under the profiler: as many of its sequences as the KV cache
    holds at their prompt length (up to its concurrency), the kernel table written to ``path``."""
    per_row = w.input_len + 8 * (passes + 6) + 1  # the prompt, decode_busy_share's tokens, a spare
    block = core.scheduler.blocks.block_size
    rows = min(w.max_num_seqs, (info.num_kv_blocks - 1) // -(-per_row // block))
    kernels: list = []
    busy = decode_busy_share(core, fixed_prompts(rows, w.input_len, seed=2), passes=passes, kernels=kernels)
    top = top_kernels(kernels, max(1, busy["steps"]))
    path.write_text(kernel_table(top, busy, w.input_len))
    return {**busy, "top_kernels": top[:8]}


def _device_us(event) -> float:
    return getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0))


def top_kernels(kernels: list, steps: int, count: int = 30) -> list[dict]:
    total = sum(_device_us(k) for k in kernels) or 1.0
    ranked = sorted(kernels, key=_device_us, reverse=True)[:count]
    return [
        {
            "kernel": k.key[:160],
            "ms_per_step": round(_device_us(k) / 1e3 / steps, 4),
            "calls_per_step": round(k.count / steps, 2),
            "share": round(_device_us(k) / total, 4),
        }
        for k in ranked
    ]


def kernel_table(top: list[dict], busy: dict, prompt_len: int) -> str:
    from stepserve.bench.trace_gaps import report as gap_report

    lines = [
        f"CUDA kernels of steady decode: {busy['steps']} steps ({busy['passes']} passes) at batch {busy['batch']}, "
        f"prompts of {prompt_len} tokens; {busy['ms_per_step']} ms a step by wall time, GPU busy {busy['busy_share']}",
        "",
        "| ms a step | calls a step | share of kernel time | kernel |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {k['ms_per_step']} | {k['calls_per_step']} | {k['share']} | {k['kernel']} |" for k in top]
    if busy.get("gaps"):  # where the GPU waited (the trace beside this file)
        lines += ["", "Idle gaps between device activities (stepserve.bench.trace_gaps):", "", gap_report(busy["gaps"])]
    return "\n".join(lines) + "\n"


def bench_server(root: Path, out: Path, results: dict) -> None:
    from stepserve.bench.gpu_serve import serve_bench

    flags = ["--async-scheduling" if ASYNC_SCHEDULING[0] else "--no-async-scheduling"]
    results["serve_8b"] = serve_bench(write_model_dir(root, "8b"), out, root / "compile", flags)
    print(f"8b server: {results['serve_8b']}", flush=True)


def bench_long(root: Path, out: Path, results: dict, thresholds: list[int]) -> None:
    """The long-prompt run once per ``--long-prefill-token-threshold`` value (0: not set): results
    ``long_8b`` and ``long_8b_threshold_N``, files in ``out`` and ``out/threshold_N``."""
    from stepserve.bench.gpu_serve import long_prompt_bench

    device = torch.cuda.get_device_name()
    for threshold in thresholds:
        flags = ["--async-scheduling" if ASYNC_SCHEDULING[0] else "--no-async-scheduling"]
        where, key = out, "long_8b"
        if threshold:
            flags += ["--long-prefill-token-threshold", str(threshold)]
            where, key = out / f"threshold_{threshold}", f"long_8b_threshold_{threshold}"
            where.mkdir(parents=True, exist_ok=True)
        results[key] = long_prompt_bench(
            write_model_dir(root, "8b"), where, root / "compile", flags, device_name=device
        )


def bench_cold(out: Path, results: dict, num_requests: int) -> None:
    from stepserve.bench.gpu_serve import cold_bench

    results["cold_8b"] = cold_bench(out, num_requests, [] if ASYNC_SCHEDULING[0] else ["--no-async-scheduling"])
    print(f"8b cold process: {results['cold_8b']}", flush=True)


def cold_main(path: Path, cache_dir: str, num_requests: int) -> None:
    """Child of ``bench_cold``: build the 8B engine (its own startup warm-up only) and time."""
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(Path(tmp), "8b")
        core, info = stepserve_engine(model_dir, "8b", 8, compilation_cache_dir=cache_dir)
        result = {
            **stepserve_throughput(core, workload()[:num_requests], warm=False),
            "load_s": round(info.load_seconds, 1),
        }
    path.write_text(json.dumps(result))


def summary(results: dict) -> dict:
    get = lambda key, field="out_tok_s": results.get(key, {}).get(field)  # noqa: E731
    n1, n8 = get("stepserve_1b_n1"), get("stepserve_1b_n8")
    return {
        "stepserve_8b_out_tok_s": get("stepserve_8b"),
        "transformers_8b_out_tok_s": get("transformers_8b"),
        "stepserve_1b_out_tok_s": n8,
        "transformers_1b_out_tok_s": get("transformers_1b"),
        "stepserve_qwen3_8b_out_tok_s": get("stepserve_qwen3-8b"),
        "transformers_qwen3_8b_out_tok_s": get("transformers_qwen3-8b"),
        "qwen3_8b_over_llama_8b": _ratio(get("stepserve_qwen3-8b"), get("stepserve_8b")),
        "stepserve_gemma3_12b_out_tok_s": get("stepserve_gemma3-12b"),
        "transformers_gemma3_12b_out_tok_s": get("transformers_gemma3-12b"),
        "batch1_8b_tok_s": get("batch1_8b", "tok_s"),
        "serve_8b_out_tok_s": _round(results.get("serve_8b", {}).get("streams_256", {}).get("output_throughput")),
        "serve_8b_ttft_mean_ms": _round(
            results.get("serve_8b", {}).get("streams_256", {}).get("ttft_ms", {}).get("mean")
        ),
        "serve_8b_batch1_tok_s": _round(1e3 / tpot)
        if (tpot := results.get("serve_8b", {}).get("streams_1", {}).get("tpot_ms", {}).get("mean"))
        else None,
        "serve_8b_over_offline": _ratio(
            results.get("serve_8b", {}).get("streams_256", {}).get("output_throughput"), get("stepserve_8b")
        ),
        "restart_8b_s": results.get("serve_8b", {}).get("restart_s"),
        "cold_8b_out_tok_s": get("cold_8b"),
        "fp8_8b_out_tok_s": get("fp8_8b"),
        "fp8_batch1_8b_tok_s": get("fp8_batch1_8b", "tok_s"),
        "fp8_kv_8b_out_tok_s": get("fp8_kv_8b"),
        "fp8_kv_batch1_8b_tok_s": get("fp8_kv_batch1_8b", "tok_s"),
        "stepserve_8b_sync_out_tok_s": get("stepserve_8b_sync"),
        "sampled_8b_top_p_out_tok_s": get("sampled_8b_top_p"),
        "sampled_8b_temperature_out_tok_s": get("sampled_8b_temperature"),
        "sampled_8b_top_p_eager_out_tok_s": get("sampled_8b_top_p_eager"),
        "sampled_8b_top_k_top_p_out_tok_s": get("sampled_8b_top_k_top_p"),
        "copy_tb_s": results.get("copy_tb_s"),
        "multistep_1b_n8_over_n1": round(n8 / n1, 3) if n1 and n8 else None,
        "greedy_check_1b_passed": results.get("greedy_check_1b", {}).get("passed"),
        "greedy_check_8b_passed": results.get("greedy_check_8b", {}).get("passed"),
        "greedy_check_qwen3_8b_passed": results.get("greedy_check_qwen3-8b", {}).get("passed"),
        "greedy_check_gemma3_12b_passed": results.get("greedy_check_gemma3-12b", {}).get("passed"),
        "device": torch.cuda.get_device_name(),
        "date": results.get("date"),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def table(s: dict, results: dict) -> str:
    ratio = lambda a, b: f"{a / b:.1f}x" if a and b else "-"  # noqa: E731
    b1 = results.get("batch1_8b", {})
    rows = [
        (
            "8B, 256 x 512 in / 256 out, output tok/s",
            s["stepserve_8b_out_tok_s"],
            s["transformers_8b_out_tok_s"],
            ratio(s["stepserve_8b_out_tok_s"], s["transformers_8b_out_tok_s"]),
        ),
        (
            "Qwen3-8B shape, same workload, output tok/s",
            s["stepserve_qwen3_8b_out_tok_s"],
            s["transformers_qwen3_8b_out_tok_s"],
            f"{ratio(s['stepserve_qwen3_8b_out_tok_s'], s['transformers_qwen3_8b_out_tok_s'])}; "
            f"{s['qwen3_8b_over_llama_8b']} of the Llama-8B figure",
        ),
        (
            "Gemma-3-12B shape, same workload, output tok/s",
            s["stepserve_gemma3_12b_out_tok_s"],
            s["transformers_gemma3_12b_out_tok_s"],
            ratio(s["stepserve_gemma3_12b_out_tok_s"], s["transformers_gemma3_12b_out_tok_s"]),
        ),
        (
            "1B, same workload, output tok/s (N=8)",
            s["stepserve_1b_out_tok_s"],
            s["transformers_1b_out_tok_s"],
            ratio(s["stepserve_1b_out_tok_s"], s["transformers_1b_out_tok_s"]),
        ),
        (
            "8B batch-1 decode tok/s",
            s["batch1_8b_tok_s"],
            "-",
            f"{b1.get('achieved_tb_s')} TB/s = {b1.get('share_of_copy_bandwidth')} of copy",
        ),
        (
            "1B N=8 over N=1 (stepserve)",
            s["multistep_1b_n8_over_n1"],
            "-",
            f"N=1: {results.get('stepserve_1b_n1', {}).get('out_tok_s')} tok/s",
        ),
        (
            "8B from a fresh process, empty compilation cache, output tok/s",
            s["cold_8b_out_tok_s"],
            "-",
            "no warm-up but the engine's own at startup",
        ),
        (
            "8B through HTTP, 256 streams, output tok/s",
            s["serve_8b_out_tok_s"],
            "-",
            f"mean TTFT {s['serve_8b_ttft_mean_ms']} ms; {s['serve_8b_over_offline']} of offline in this run "
            "(target 0.95)",
        ),
        (
            "8B through HTTP, one stream, tok/s (1 / mean TPOT)",
            s["serve_8b_batch1_tok_s"],
            "-",
            f"restart after kill -9: {s['restart_8b_s']} s",
        ),
        (
            "8B FP8 weights, output tok/s",
            s["fp8_8b_out_tok_s"],
            "-",
            "e4m3 per-channel, torch._scaled_mm; 1-2 rows the Triton gemv",
        ),
        (
            "8B FP8 batch-1 decode tok/s",
            s["fp8_batch1_8b_tok_s"],
            "-",
            f"{results.get('fp8_batch1_8b', {}).get('achieved_tb_s')} TB/s",
        ),
        (
            "8B bf16, FP8 KV cache, output tok/s",
            s["fp8_kv_8b_out_tok_s"],
            "-",
            f"batch 1: {s['fp8_kv_batch1_8b_tok_s']} tok/s",
        ),
        (
            "8B bf16, synchronous scheduling, output tok/s",
            s["stepserve_8b_sync_out_tok_s"],
            "-",
            "same engine and prompts, prefix cache off",
        ),
        (
            "8B sampled, temperature 0.8 top-p 0.95, output tok/s",
            s["sampled_8b_top_p_out_tok_s"],
            "-",
            f"eager sampling: {s['sampled_8b_top_p_eager_out_tok_s']}; "
            f"temperature alone: {s['sampled_8b_temperature_out_tok_s']}; "
            f"top-k 20 with top-p: {s['sampled_8b_top_k_top_p_out_tok_s']}",
        ),
        ("device copy bandwidth, TB/s", round(s["copy_tb_s"], 2) if s["copy_tb_s"] else None, "-", s["device"]),
    ]
    lines = ["| measure | stepserve | transformers CB | ratio / note |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


ORDER = ("8b", "qwen3-8b", "gemma3-12b", "1b")  # stepserve runs first, in this order; then transformers
EXTRAS = ("fp8", "fp8kv", "cold", "serve", "long")  # on the 8B shape, after them
ON_REQUEST = ("trtllm",)  # on the 8B shape, last, and only when --only names them


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for gpu_bench.json")
    parser.add_argument(
        "--only",
        help=f"comma-separated parts to run, of {', '.join(ORDER + EXTRAS + ON_REQUEST)} "
        f"(default: all but {', '.join(ON_REQUEST)})",
    )
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument(
        "--skip-cb", action="store_true", help="keep the greedy check, leave out transformers' continuous batching"
    )
    parser.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stepserve engines schedule asynchronously",
    )
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also write the 8B kernel profile, and each trtllm workload's steady decode profile",
    )
    parser.add_argument("--num-requests", type=int, default=NUM_REQUESTS, help="fewer requests for a smoke run")
    parser.add_argument("--skip-fp8", action="store_true")
    parser.add_argument("--skip-serve", action="store_true", help="no HTTP server run (neither serve nor long)")
    parser.add_argument("--skip-cold", action="store_true", help="no fresh-process run")
    parser.add_argument(
        "--trtllm-workloads",
        help="comma-separated workloads of the trtllm part (default: all of stepserve.bench.throughput.WORKLOADS)",
    )
    parser.add_argument(
        "--trtllm-scale", type=float, default=1.0, help="multiplies the trtllm workloads' request counts"
    )
    parser.add_argument(
        "--trtllm-precisions",
        default=",".join(TRTLLM_PRECISIONS),
        help=f"comma-separated precisions of the trtllm part, in order (default: {','.join(TRTLLM_PRECISIONS)})",
    )
    parser.add_argument(
        "--long-thresholds",
        default="0",
        help="comma-separated --long-prefill-token-threshold values of the long part, one run each (0: unset)",
    )
    parser.add_argument("--cold", help=argparse.SUPPRESS)  # internal: the fresh-process child writes here
    parser.add_argument("--compilation-cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ASYNC_SCHEDULING[0] = args.async_scheduling
    if args.cold:
        return cold_main(Path(args.cold), args.compilation_cache_dir, args.num_requests)
    chosen = args.only.split(",") if args.only else list(ORDER + EXTRAS)
    shapes = [s for s in ORDER if s in chosen]
    unknown = set(chosen) - set(ORDER + EXTRAS + ON_REQUEST)
    if unknown:
        parser.error(
            f"unknown parts: {', '.join(sorted(unknown))}; choose from {', '.join(ORDER + EXTRAS + ON_REQUEST)}"
        )
    trtllm_workloads = trtllm_names(parser, args.trtllm_workloads)
    try:
        long_thresholds = [int(t) for t in args.long_thresholds.split(",")]
    except ValueError:
        parser.error(f"--long-thresholds takes whole numbers, not {args.long_thresholds!r}")
    trtllm_precisions = args.trtllm_precisions.split(",")
    if set(trtllm_precisions) - set(TRTLLM_PRECISIONS):
        parser.error(f"unknown trtllm precisions: {args.trtllm_precisions}; choose from {', '.join(TRTLLM_PRECISIONS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "date": args.date,
        "workload": f"{NUM_REQUESTS} x {PROMPT_LEN} in / {OUTPUT_LEN} out, ignore_eos, greedy",
    }
    results["copy_tb_s"] = round(copy_bandwidth(), 3)
    prompts = workload()[: args.num_requests]

    def save():
        (out / "gpu_bench.json").write_text(json.dumps({**summary(results), "details": results}, indent=2))

    def attempt(name: str, run) -> None:  # keep what was measured; say what broke
        try:
            run()
        except Exception as exc:
            logging.exception("the %s benchmark failed", name)
            results[f"error_{name}"] = repr(exc)
            free_gpu()
        save()

    outputs: dict[str, dict] = {shape: {} for shape in shapes}
    # stepserve's teacher-forced logprobs for the greedy check, collected while its engine lives
    logprobs: dict[str, dict | None] = {shape: None if args.skip_transformers else {} for shape in shapes}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for shape in shapes:
            if shape == "8b":
                attempt(
                    shape,
                    lambda: bench_8b(
                        root,
                        prompts,
                        results,
                        results["copy_tb_s"],
                        out if args.profile else None,
                        outputs["8b"],
                        logprobs["8b"],
                    ),
                )
            elif shape == "1b":
                attempt(shape, lambda: bench_1b(root, prompts, results, outputs["1b"], logprobs["1b"]))
            else:
                attempt(
                    shape,
                    lambda shape=shape: bench_family(root, shape, prompts, results, outputs[shape], logprobs[shape]),
                )
        for shape in shapes if not args.skip_transformers else ():
            if outputs[shape]:
                attempt(
                    f"transformers_{shape}",
                    lambda shape=shape: bench_transformers(
                        root, shape, prompts, results, outputs[shape], logprobs[shape], args.skip_cb
                    ),
                )
        extras = (
            ("fp8", args.skip_fp8, lambda: bench_fp8(root, prompts, results, results["copy_tb_s"])),
            ("fp8kv", args.skip_fp8, lambda: bench_fp8_kv(root, prompts, results, results["copy_tb_s"])),
            ("cold", args.skip_cold, lambda: bench_cold(out, results, args.num_requests)),
            ("serve", args.skip_serve, lambda: bench_server(root, out, results)),
            ("long", args.skip_serve, lambda: bench_long(root, out, results, long_thresholds)),
        )
        for name, skip, run in extras:
            if name in chosen and not skip:
                attempt(name, run)
        for precision in trtllm_precisions if "trtllm" in chosen else ():
            for name in trtllm_workloads:
                attempt(
                    f"trtllm_{precision}_{name}",
                    lambda p=precision, n=name: bench_trtllm(
                        root, p, n, args.trtllm_scale, results, out if args.profile else None
                    ),
                )
    s = summary(results)
    save()
    print(table(s, results))
    print(json.dumps(s, indent=2))


def trtllm_names(parser: argparse.ArgumentParser, given: str | None) -> list[str]:
    from stepserve.bench.throughput import WORKLOADS

    names = given.split(",") if given else list(WORKLOADS)
    unknown = set(names) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown trtllm workloads: {', '.join(sorted(unknown))}; choose from {', '.join(WORKLOADS)}")
    return names


if __name__ == "__main__":
    main()
