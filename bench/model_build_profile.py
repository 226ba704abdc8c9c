"""Where a fresh process's model build goes (the restart's largest phase): the Llama-8B shape
built with random weights (``--load-format dummy``) on the GPU. ``phases``: twice in one fresh
process, each phase timed with the device synchronized; ``profile``: once in a fresh process
under cProfile. Run on the GPU machine: python bench/model_build_profile.py phases|profile"""

import cProfile
import io
import pstats
import sys
import time

start = time.monotonic()
import torch  # noqa: E402

torch.zeros(1, device="cuda")
torch.cuda.synchronize()
print(f"torch and the CUDA context: {time.monotonic() - start:.2f}s", flush=True)
t = time.monotonic()
from stepserve.bench.gpu import SHAPES  # noqa: E402
from stepserve.models.decoder import DecoderForCausalLM  # noqa: E402
from stepserve.models.loader import build_model, fill_dummy  # noqa: E402
from stepserve.models.registry import decoder_config  # noqa: E402

print(f"stepserve imports: {time.monotonic() - t:.2f}s", flush=True)
cfg = decoder_config(SHAPES["8b"], 1024)


def phases() -> None:
    t = time.monotonic()
    with torch.device("meta"):
        model = DecoderForCausalLM(cfg, 1032)
    print(f"  meta build {time.monotonic() - t:.2f}s", flush=True)
    t = time.monotonic()
    model = model.to(torch.bfloat16).to_empty(device="cuda")
    torch.cuda.synchronize()
    print(f"  to_empty on cuda {time.monotonic() - t:.2f}s ({torch.cuda.memory_reserved() / 2**30:.1f} GiB reserved)", flush=True)
    t = time.monotonic()
    model.fill_rotary()
    torch.cuda.synchronize()
    print(f"  fill_rotary {time.monotonic() - t:.2f}s", flush=True)
    t = time.monotonic()
    fill_dummy(model, 0)
    torch.cuda.synchronize()
    print(f"  fill_dummy {time.monotonic() - t:.2f}s", flush=True)
    del model
    torch.cuda.empty_cache()


if sys.argv[1] == "phases":
    for attempt in ("first", "second"):
        print(f"{attempt} build, by phase:", flush=True)
        phases()
    t = time.monotonic()
    plain = [torch.empty(4096 * 14336, dtype=torch.bfloat16, device="cuda") for _ in range(64)]
    torch.cuda.synchronize()
    print(f"64 plain allocations of 112 MiB: {time.monotonic() - t:.2f}s", flush=True)
    sys.exit()
profile = cProfile.Profile()
profile.enable()
t = time.monotonic()
model = build_model(cfg, None, torch.bfloat16, torch.device("cuda"), 1032)
torch.cuda.synchronize()
profile.disable()
print(f"build_model in a fresh process, under cProfile: {time.monotonic() - t:.2f}s", flush=True)
for order, count in (("cumulative", 30), ("tottime", 15)):
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats(order).print_stats(count)
    print(out.getvalue())
