"""Build the worker an engine core drives, from an ``EngineConfig``: device and precision, the
model and its weights, the KV cache sized from memory, the ``ModelRunner`` (CUDA graphs on a
GPU). With ``--tensor-parallel-size N`` rank 0 starts the other ranks here and gets the group's
worker; ranks 1..N-1 call ``build_worker`` with their place in the group. The scheduler and the
engine core are ``engine/builder.py``'s."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from stepserve.attention import get_backend
from stepserve.config import ConfigError, EngineConfig
from stepserve.core.outputs import ModelInfo
from stepserve.distributed.group import TensorParallel, start_tensor_parallel
from stepserve.executor.tensor_parallel import TensorParallelWorker
from stepserve.models.cpu_linear import CpuLinear, cpu_has_bf16, release_free_memory
from stepserve.models.cpu_linear import warm_up as warm_up_linears
from stepserve.models.config import fp8_format
from stepserve.models.loader import build_model, decoder_config, open_checkpoint
from stepserve.checkpoint.tokenizer import eos_token_ids as eos_token_ids_of
from stepserve.checkpoint.tokenizer import load_tokenizer
from stepserve.checkpoint.config import resolve_max_model_len
from stepserve.worker.compile_cache import use_compilation_cache
from stepserve.structured.bitmask import GrammarMatchers
from stepserve.structured.compiler import ll_tokenizer_in_background
from stepserve.worker.cuda_graphs import graph_batch_sizes
from stepserve.worker.encoder_runner import EncoderRunner, EncoderSpec, load_encoder_model
from stepserve.worker.runner import ModelRunner, allocate_kv_cache, kv_cache_bytes_per_block, profile_run
from stepserve.worker.speculative import DraftModel, Eagle3Drafter

log = logging.getLogger("stepserve")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available; use --device cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device, hf_config: dict) -> torch.dtype:
    """``auto`` follows the checkpoint as vLLM does. On CUDA: float16 stays float16, bfloat16
    stays bfloat16, float32 (and a GGUF) runs in bfloat16. On a CPU with native bfloat16,
    bfloat16 unless the checkpoint says float32 (a GGUF says nothing: its weights are quantized
    or half precision); on other CPUs float32."""
    if name != "auto":
        return _DTYPES[name]
    declared = hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"  # HF's default
    if device.type == "cuda":
        return torch.float16 if declared == "float16" and "gguf_linear_type" not in hf_config else torch.bfloat16
    float32_checkpoint = "gguf_linear_type" not in hf_config and declared == "float32"
    return torch.float32 if float32_checkpoint or not cpu_has_bf16() else torch.bfloat16


INT4_ACTIVATIONS = (torch.bfloat16, torch.float32)  # what the CPU's int4 kernels take beside 4-bit weights


def pick_quantization(name: str, device: torch.device, dtype: torch.dtype, hf_config: dict) -> str:
    """``auto``: int4 for a GGUF whose projections are 4-bit (Q4_0/Q4_1) on a CPU, with bfloat16
    or float32 activations (``pick_dtype`` gives float32 where the CPU has no native bfloat16);
    fp8 for an FP8 checkpoint on a GPU with FP8 matrix units and 16-bit activations (elsewhere it
    runs dequantized)."""
    if name == "auto":
        four_bit = hf_config.get("gguf_linear_type") in ("Q4_0", "Q4_1")
        if fp8_format(hf_config) is not None:
            fp8_ready = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
            return "fp8" if fp8_ready and dtype in (torch.bfloat16, torch.float16) else "none"
        return "int4" if four_bit and device.type == "cpu" and dtype in INT4_ACTIVATIONS else "none"
    if name == "fp8" and (device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9)):
        raise ConfigError(
            "quantization=fp8 needs a CUDA GPU with FP8 matrix units (Ada or Hopper, "
            "compute capability 8.9+); use --quantization none"
        )
    if name == "fp8" and dtype not in (torch.bfloat16, torch.float16):
        raise ConfigError("quantization=fp8 needs bfloat16 or float16 activations; use --dtype bfloat16")
    if name == "int4" and device.type != "cpu":
        raise ConfigError("quantization=int4 runs on CPU only; on CUDA use --quantization none")
    if name == "int4" and (dtype not in INT4_ACTIVATIONS or dtype == torch.bfloat16 and not cpu_has_bf16()):
        raise ConfigError(
            "quantization=int4 needs float32 activations, or bfloat16 on a CPU with "
            "AVX512-BF16 or AMX; use --dtype float32, or --quantization none"
        )
    return name


def _num_blocks(
    config: EngineConfig, model, backend, dtype, device, max_model_len: int, graph_sizes: list[int], draft=None
) -> int:
    """``draft``: a draft model whose KV cache has the same blocks (speculative decoding)."""
    cache = config.cache
    if cache.num_blocks is not None:
        num_blocks = cache.num_blocks
    else:
        per_block = kv_cache_bytes_per_block(model, cache.block_size, dtype)
        if draft is not None:
            per_block += kv_cache_bytes_per_block(draft, cache.block_size, dtype)
        if device.type == "cuda":
            budget = _gpu_kv_budget(config, model, backend, device, graph_sizes)
        else:
            budget = cache.cpu_kv_cache_gib * 2**30
        num_blocks = int(budget // per_block)
    needed = -(-max_model_len // cache.block_size) + 1
    if num_blocks < needed:
        raise ConfigError(
            f"the KV cache ({num_blocks} blocks of {cache.block_size} tokens) cannot hold one request of "
            f"max_model_len={max_model_len}; lower max_model_len or give the cache more memory"
        )
    return num_blocks


def _gpu_kv_budget(config: EngineConfig, model, backend, device, graph_sizes: list[int]) -> float:
    """Bytes for the KV cache: the utilization share of the GPU, less what other processes and
    the CUDA context hold, the weights, the peak activations of a profile run of the largest
    pass, and the CUDA graphs' logits buffers and sampling temporaries."""
    sched = config.scheduler
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    weights = torch.cuda.memory_allocated(device)
    log.info(
        "profiling a forward pass of %d tokens (%d sequences) to size the KV cache",
        sched.max_num_batched_tokens,
        sched.max_num_seqs,
    )
    profile_run(model, backend, config.cache.block_size, sched.max_num_batched_tokens, sched.max_num_seqs, device)
    torch.cuda.synchronize(device)
    activations = torch.cuda.max_memory_allocated(device) - weights
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    others = total - free - torch.cuda.memory_reserved(device)
    # The graphs' one float32 logits buffer (every bucket's logits are rows of it), and 40 bytes a
    # logit at the largest bucket for sampling's temporaries: the sampling graphs', and the eager
    # paths' [rows, vocab] tensors (logprobs, penalties, logits processors). Capturing 68 graphs at
    # 1,024 rows reserved 0.43 GiB on an H100 (2026-12-07); the eager paths were not measured.
    vocab = model.cfg.vocab_size
    graphs = (max(graph_sizes) * vocab * (4 + 40) + 2**29) if graph_sizes else 0
    budget = total * config.cache.gpu_memory_utilization - others - weights - activations - graphs
    log.info(
        "GPU memory: %.1f GiB total, weights %.2f GiB, peak activations %.2f GiB, "
        "graphs %.2f GiB, other %.2f GiB -> KV cache %.1f GiB",
        total / 2**30,
        weights / 2**30,
        activations / 2**30,
        graphs / 2**30,
        others / 2**30,
        budget / 2**30,
    )
    return budget


@dataclass(frozen=True)
class BuiltWorker:
    """What ``build_worker`` made, for the engine builder."""

    worker: object  # what the engine core drives: the runner, or rank 0's tensor-parallel worker
    runner: ModelRunner  # this rank's runner
    tokenizer: object | None  # loaded here only when the caller did not pass the EOS ids
    info: ModelInfo  # facts learned while building
    window: int  # the attention window when every layer is windowed (the scheduler frees blocks behind it), else 0


def build_worker(
    config: EngineConfig,
    weights=None,
    eos_token_ids: frozenset[int] | None = None,
    rank: TensorParallel | None = None,
) -> BuiltWorker:
    """The worker for ``config``. ``weights`` (a ``(hf_name, tensor)`` stream) replaces the
    checkpoint files when given. ``rank`` is set in tensor-parallel ranks 1..N-1; on rank 0 the
    group is started here (``distributed``)."""
    start = time.monotonic()
    spec = config.scheduler.speculative
    checkpoint = open_checkpoint(config.model.model)
    source, hf_config = checkpoint.source, checkpoint.hf_config
    max_model_len = resolve_max_model_len(config.model.max_model_len, hf_config)
    model_config = decoder_config(hf_config, max_model_len)
    device = pick_device(config.model.device)
    dtype = pick_dtype(config.model.dtype, device, hf_config)
    quantization = pick_quantization(config.model.quantization, device, dtype, hf_config)
    if eos_token_ids is None:
        tokenizer = load_tokenizer(source)
        eos = eos_token_ids_of(source, hf_config, tokenizer)
    else:  # the core process: the front already read them (loading a tokenizer takes seconds)
        tokenizer, eos = None, frozenset(eos_token_ids)
    tp = rank or start_tensor_parallel(config, model_config, eos, device, quantization)
    device = tp.device(device)
    steps = config.scheduler.num_scheduler_steps
    if device.type == "cuda":
        use_compilation_cache(config.model.compilation_cache_dir)
    weights = tp.weights(
        checkpoint,
        model_config,
        weights,
        config.model.load_format,
        torch.float32 if quantization == "int4" else dtype,
        device,
    )
    loading = time.monotonic()
    model = build_model(
        tp.shard_config(model_config),
        weights,
        dtype,
        device,
        max_positions=max_model_len + steps,
        quantization=quantization,
        seed=config.model.seed,
        lora=(config.lora.max_loras, config.lora.max_lora_rank) if config.lora.enable_lora else None,
    )
    # Each phase of start-up is logged with its time: a restart's budget is spent somewhere.
    log.info(
        "model weights on %s in %.1fs (%.1fs since the engine build began)",
        device,
        time.monotonic() - loading,
        time.monotonic() - start,
    )
    tp.join(model)
    # A drafter runs on rank 0 alone, whole (proposals go back to the scheduler, which sends
    # them to every rank with the next pass); the other ranks only verify.
    draft = None
    if spec is not None and spec.method == "draft_model" and rank is None:
        draft = _load_draft(config, model_config, dtype, device, max_model_len)
    elif spec is not None and spec.method == "eagle3" and rank is None:
        draft = _load_eagle3_head(config, model, dtype, device, max_model_len)
    # On CUDA: Triton kernels, and CUDA graphs of the decode step unless enforce_eager.
    backend = get_backend("triton" if device.type == "cuda" else "sdpa")
    use_graphs = device.type == "cuda" and not config.model.enforce_eager
    graph_sizes = graph_batch_sizes(config.scheduler.max_num_seqs) if use_graphs else []
    if draft is not None and spec.method == "eagle3":  # the head reads three layers' states of every pass
        model.keep_aux_states(draft.spec.aux_layers, max([config.scheduler.max_num_batched_tokens, *graph_sizes]))
    # CPU attention runs in float32 whatever the weights: PyTorch's CPU SDPA is several times
    # slower in bfloat16 (docs/benchmarks.md).
    kv_dtype = torch.float32 if device.type == "cpu" else dtype
    if config.cache.kv_cache_dtype == "fp8":
        kv_dtype = torch.float8_e4m3fn  # the attention backends dequantize pages as they read them
    num_blocks = tp.min(
        _num_blocks(config, model, backend, kv_dtype, device, max_model_len, graph_sizes, draft), device
    )
    kv_caches = allocate_kv_cache(model, num_blocks, config.cache.block_size, kv_dtype, device)
    grammars = GrammarMatchers(
        lambda: ll_tokenizer_in_background(
            lambda: tokenizer if tokenizer is not None else load_tokenizer(source), model_config.vocab_size, eos
        ),
        model.cfg.vocab_size,
        eos,
        device,
    )
    # llguidance's tokenizer (for the grammars of constrained requests) is built in a thread. On
    # a GPU that waits until the engine is first idle (or a constrained request needs it): that
    # thread's Python work holds the GIL against the graph captures and the first passes. On the
    # CPU it starts now, beside the kernels' warm-up, so the core's memory holds it from start-up
    # on instead of growing in the middle of serving when the first constrained request comes.
    if device.type == "cpu":
        grammars.start_tokenizer()
    runner = ModelRunner(model, kv_caches, config.cache.block_size, backend, eos, device, config.model.seed, grammars)
    if config.lora.enable_lora:
        from stepserve.worker.lora_slots import LoraSlots

        lora = config.lora
        shard = tp.adapter_shard(model_config)
        runner.lora = LoraSlots(model, lora.max_loras, lora.max_lora_rank, lora.max_cpu_loras, shard)
        if device.type == "cuda":
            _warm_up_lora(model, config)
    if draft is not None:
        draft_caches = allocate_kv_cache(draft, num_blocks, config.cache.block_size, kv_dtype, device)
        if spec.method == "eagle3":
            runner.draft = Eagle3Drafter(draft, model, draft_caches, backend, config.cache.block_size)
        else:
            runner.draft = DraftModel(draft, draft_caches, backend, config.cache.block_size)
    if use_graphs:
        runner.capture_cuda_graphs(graph_sizes, max_model_len, steps)
    if device.type == "cpu":
        _warm_up_cpu(model, config)
        if draft is not None and spec.method == "draft_model":
            _warm_up_cpu(draft, config)
    info = ModelInfo(
        source.name,
        max_model_len,
        eos,
        num_blocks,
        device.type,
        str(dtype).removeprefix("torch."),
        quantization,
        time.monotonic() - start,
    )
    window = max(model_config.layer_windows) if model_config.all_windowed else 0
    # A tensor-parallel group's worker has no submit/collect: its passes run synchronously.
    worker = runner
    if tp.ranks is not None:
        tp.ranks.wait_ready()
        worker = TensorParallelWorker(runner, tp.ranks)
    return BuiltWorker(worker, runner, tokenizer, info, window)


def _load_eagle3_head(config: EngineConfig, model, dtype: torch.dtype, device: torch.device, max_model_len: int):
    """The EAGLE-3 head of ``--speculative-config`` (method eagle3), on the target's device and
    in its dtype, reading the target's embedding unless it has its own (``models/eagle3.py``)."""
    from stepserve.checkpoint.source import resolve_source
    from stepserve.models.eagle3 import build_eagle3_head, read_eagle3_spec, read_head_config
    from stepserve.models.llama import llama

    spec = config.scheduler.speculative
    source = resolve_source(spec.model)
    if source.gguf_file is not None:
        raise ConfigError("an EAGLE-3 head is a directory (config.json and its weights), not a GGUF file")
    target = model.cfg
    head_spec = read_eagle3_spec(read_head_config(source.directory), target.num_layers, target.hidden_size)
    vocab = head_spec.layer.get("vocab_size", target.vocab_size)
    if vocab != target.vocab_size:
        raise ConfigError(
            f"the EAGLE-3 head's vocabulary ({vocab} tokens) is not the target's ({target.vocab_size}): "
            "it was made for another model"
        )
    cfg = llama({**head_spec.layer, "num_hidden_layers": 1}, "LlamaForCausalLM", max_model_len)
    dummy = config.model.load_format == "dummy"
    head = build_eagle3_head(
        None if dummy else source.directory,
        head_spec,
        cfg,
        model.embed_tokens,
        dtype,
        device,
        max_model_len + spec.num_speculative_tokens + 1,
        config.model.seed + 1,
    )
    log.info(
        "EAGLE-3 head %s loaded (reads target layers %s, proposes from %d tokens), proposing %d tokens",
        source.name,
        list(head_spec.aux_layers),
        head_spec.draft_vocab_size,
        spec.num_speculative_tokens,
    )
    return head


def _load_draft(config: EngineConfig, target, dtype: torch.dtype, device: torch.device, max_model_len: int):
    """The draft model of ``--speculative-config`` (method draft_model), on the target's device
    and in its dtype; it must share the target's vocabulary and cover its context."""
    spec = config.scheduler.speculative
    checkpoint = open_checkpoint(spec.model)
    hf_config = checkpoint.hf_config
    native = hf_config.get("max_position_embeddings", 2048)
    if native < max_model_len:
        raise ConfigError(
            f"the draft model {checkpoint.source.name} has {native} positions, fewer than max_model_len="
            f"{max_model_len}: lower --max-model-len"
        )
    cfg = decoder_config(hf_config, max_model_len)
    if cfg.vocab_size != target.vocab_size:
        raise ConfigError(
            f"the draft model's vocabulary ({cfg.vocab_size} tokens) is not the target's ({target.vocab_size}): "
            "a draft model must have the target's tokenizer"
        )
    quantization = pick_quantization("auto", device, dtype, hf_config)
    weights = None
    if config.model.load_format != "dummy":
        weights = checkpoint.weights(torch.float32 if quantization == "int4" else dtype, device)
    draft = build_model(
        cfg,
        weights,
        dtype,
        device,
        max_positions=max_model_len + spec.num_speculative_tokens + 1,
        quantization=quantization,
        seed=config.model.seed + 1,
    )
    log.info(
        "draft model %s loaded (%s), proposing %d tokens",
        checkpoint.source.name,
        cfg.architecture,
        spec.num_speculative_tokens,
    )
    return draft


def _warm_up_lora(model, config: EngineConfig) -> None:
    """The LoRA kernels of every batch size class, compiled before serving: the engine's warm-up
    runs no adapter, and an eager pass's first compile would otherwise stall live traffic."""
    from stepserve.models.lora import warm_up_lora_kernels

    start = time.monotonic()
    with torch.inference_mode():
        calls = warm_up_lora_kernels(model, config.scheduler.max_num_batched_tokens)
    log.info("LoRA kernels compiled for %d projection shapes x batch sizes in %.1fs", calls, time.monotonic() - start)


def _warm_up_cpu(model, config: EngineConfig) -> None:
    """oneDNN's kernels for every padded row count a pass can bring (``cpu_linear.warm_up``): the
    projections up to the pass's token budget, the head up to the batch's rows."""
    start = time.monotonic()
    calls = warm_up_linears(model.layers, config.scheduler.max_num_batched_tokens)
    if isinstance(model.packed_head, CpuLinear):
        calls += warm_up_linears(model.packed_head, config.scheduler.max_num_seqs)
    if calls:
        release_free_memory()
        log.info("CPU matmul kernels made for %d (shape, row count) pairs in %.1fs", calls, time.monotonic() - start)


def build_encoder_worker(spec: EncoderSpec, name: str, max_model_len: int) -> tuple[EncoderRunner, ModelInfo]:
    """The worker of an encoder model (``worker/encoder_runner.py``), on the device and in the
    dtype the decoder's rules pick for ``auto``. It keeps no KV cache."""
    start = time.monotonic()
    device = pick_device(spec.device)
    dtype = pick_dtype(spec.dtype, device, {"dtype": spec.checkpoint_dtype})
    runner = EncoderRunner(load_encoder_model(spec, device, dtype), spec, device)
    info = ModelInfo(
        name,
        max_model_len,
        frozenset(),
        0,
        device.type,
        str(dtype).removeprefix("torch."),
        "none",
        time.monotonic() - start,
    )
    return runner, info
