"""``--dtype auto`` follows the checkpoint as vLLM does (the rule is in the README)."""

import pytest
import torch

from stepserve.executor import builder
from stepserve.executor.builder import pick_dtype

CUDA = torch.device("cuda")  # a device object only: nothing runs on it


@pytest.mark.parametrize(
    ("declared", "expected"),
    [("float16", torch.float16), ("bfloat16", torch.bfloat16), ("float32", torch.bfloat16), (None, torch.bfloat16)],
)
def test_auto_on_cuda_follows_the_checkpoint(declared, expected):
    config = {} if declared is None else {"torch_dtype": declared}
    assert pick_dtype("auto", CUDA, config) == expected
    assert pick_dtype("auto", CUDA, {"dtype": declared} if declared else {}) == expected  # transformers 5 spelling


def test_auto_on_cuda_runs_a_gguf_in_bfloat16():
    assert pick_dtype("auto", CUDA, {"torch_dtype": "float16", "gguf_linear_type": "Q4_1"}) == torch.bfloat16


@pytest.mark.parametrize("has_bf16", [True, False])
def test_auto_on_cpu(monkeypatch, has_bf16):
    monkeypatch.setattr(builder, "cpu_has_bf16", lambda: has_bf16)
    cpu = torch.device("cpu")
    half = torch.bfloat16 if has_bf16 else torch.float32
    assert pick_dtype("auto", cpu, {"torch_dtype": "float32"}) == torch.float32
    assert pick_dtype("auto", cpu, {"torch_dtype": "bfloat16"}) == half
    assert pick_dtype("auto", cpu, {"torch_dtype": "float16"}) == half
    assert pick_dtype("auto", cpu, {"gguf_linear_type": "Q4_1"}) == half


def test_explicit_dtype_wins():
    assert pick_dtype("float16", torch.device("cpu"), {"torch_dtype": "float32"}) == torch.float16
