"""GPU tests run where CUDA is present and skip elsewhere. With TRITON_INTERPRET=1 the Triton
kernel tests also run on the CPU through Triton's interpreter (slow, for kernel development)."""

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def kernel_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if INTERPRET:
        return "cpu"
    pytest.skip("needs CUDA (or TRITON_INTERPRET=1 for the kernels)")


@pytest.fixture
def device() -> str:
    return kernel_device()
