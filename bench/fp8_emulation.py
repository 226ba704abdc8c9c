"""What FP8's numerics alone cost the embedded model, measured on the CPU: the yardstick for the
bounds of the GPU test ``test_fp8_greedy_agrees_with_bf16_on_the_embedded_model``.

Every decoder projection is replaced by a plain-torch emulation of ``Fp8Linear``: weights rounded
to e4m3 with one scale per output channel, activations rounded to bf16 and, for calls of more
than ``GEMV_MAX_ROWS`` rows, to e4m3 with one scale per token; output rounded to bf16. The rest of
the model runs in ``--dtype`` (bfloat16, as on the GPU, or float32). Each of 8 chat prompts gets
24 greedy tokens from the emulated model; the float32 model then scores them teacher-forced, as
the GPU test does with its bf16 model. Prints the share of tokens that are float32's argmax
(rank 1), the mean and largest gaps in nats, and how many tokens fall over 1 nat. Rerun it when
the FP8 path's rounding changes, and compare with what the GPU test allows.

    .venv/bin/python bench/fp8_emulation.py [bfloat16|float32]
"""

import sys

import torch
from torch import nn

import stepserve.executor.builder as builder
import stepserve.models.loader  # noqa: F401  (imported before the stand-in module is put in place)
from stepserve import LLM, SamplingParams

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
GEMV_MAX_ROWS = 2  # as stepserve.models.fp8 (not imported: it needs Triton)
PROMPTS = [
    "What is the capital of France?",
    "What is 12 times 7?",
    "Name three colors.",
    "Write a haiku about the sea.",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water?",
    "List the planets.",
    "Say hello.",
]


def e4m3(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` rounded to e4m3 with one scale per slice along ``dim``, back in float32."""
    scale = (x.abs().amax(dim=dim, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * scale


class EmulatedFp8Linear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = e4m3(linear.weight.data.float(), dim=1)
        self.bias = None if linear.bias is None else linear.bias.data.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, dtype = x.shape[:-1], x.dtype
        x = x.reshape(-1, x.shape[-1]).bfloat16().float()
        if x.shape[0] > GEMV_MAX_ROWS:
            x = e4m3(x, dim=1)
        y = x @ self.weight.t()
        if self.bias is not None:
            y = y + self.bias
        return y.bfloat16().to(dtype).view(*lead, -1)


def emulate_fp8(model: nn.Module) -> None:
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, EmulatedFp8Linear(child))


def main() -> None:
    dtype = sys.argv[1] if len(sys.argv) > 1 else "bfloat16"
    stand_in = type(sys)("stepserve.models.fp8")
    stand_in.quantize_fp8 = emulate_fp8
    sys.modules["stepserve.models.fp8"] = stand_in  # the loader imports quantize_fp8 from here
    real_pick = builder.pick_quantization
    builder.pick_quantization = lambda name, *rest: "fp8" if name == "fp8" else real_pick(name, *rest)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    emulated = LLM(device="cpu", dtype=dtype, quantization="fp8", max_model_len=512)
    outs = emulated.chat([[{"role": "user", "content": p}] for p in PROMPTS], params)
    seqs = [(list(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in outs]
    del emulated
    reference = LLM(device="cpu", dtype="float32", quantization="none", max_model_len=512)
    forced = reference.generate(
        [p + o for p, o in seqs], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    )
    marks = [
        (lp.rank, lp.top[0][1] - lp.logprob) for (p, _), r in zip(seqs, forced) for lp in r.prompt_logprobs[len(p) :]
    ]
    gaps = sorted(g for _, g in marks)
    print(
        f"emulated fp8 ({dtype} elsewhere) vs float32: "
        f"{sum(r == 1 for r, _ in marks) / len(marks):.3f} rank 1 of {len(marks)}, "
        f"mean gap {sum(gaps) / len(gaps):.3f}, largest {[round(g, 3) for g in gaps[-5:]]}, "
        f"over 1 nat: {sum(g > 1 for g in gaps)}"
    )


if __name__ == "__main__":
    main()
