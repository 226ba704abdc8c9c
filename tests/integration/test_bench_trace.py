"""The GPU benchmarks' trace writing (``gpu._trace_gaps``) on a CPU profile: the Chrome trace is
written gzipped where asked, the raw file removed, and a profile without device activity says so."""

import gzip
import json

import torch
from torch.profiler import ProfilerActivity, profile

from stepserve.bench.gpu import _trace_gaps


def test_the_trace_is_written_gzipped_and_summarised(tmp_path):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.ones(64, 64) @ torch.ones(64, 64)
    path = tmp_path / "profile_trace.json.gz"
    summary = _trace_gaps(prof, path)
    assert summary == {"activities": 0}  # the CPU's ops are not device activity
    with gzip.open(path, "rt") as f:
        assert any(e.get("cat") == "cpu_op" for e in json.load(f)["traceEvents"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profile_trace.json.gz"]
