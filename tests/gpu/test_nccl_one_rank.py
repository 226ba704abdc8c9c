"""The NCCL path on one GPU, for what a machine of one GPU can check: a one-rank NCCL group (what
each tensor-parallel rank joins) sums a row-parallel projection's output (``AllReduced``) inside a
CUDA graph as it does eagerly, replayed on new inputs. The two-rank run is
tests/gpu/test_tensor_parallel_nccl.py."""

import pytest
import torch
import torch.distributed as dist

from stepserve.distributed.group import backend_for, init_group
from stepserve.distributed.layers import AllReduced

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_all_reduce_in_a_cuda_graph_on_one_rank(tmp_path):
    assert backend_for("cuda") == "nccl"
    init_group(0, 1, str(tmp_path / "store"), "cuda")
    try:
        torch.manual_seed(0)
        layer = AllReduced(torch.nn.Linear(256, 128, device="cuda", dtype=torch.bfloat16), None)
        x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
        eager = layer(x)
        assert torch.equal(eager, layer.inner(x))  # one rank: the sum is the rank's own product
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the default stream, as capture wants
            layer(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, layer.inner(x))
    finally:
        dist.destroy_process_group()
