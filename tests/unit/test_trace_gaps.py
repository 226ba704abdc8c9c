"""The idle-gap report of a profiler trace, on a hand-made Chrome trace."""

import gzip
import json

from stepserve.bench.trace_gaps import device_activities, gap_summary, main, read_trace


def kernel(name, ts, dur, cat="kernel", stream=7):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": stream}


TRACE = {
    "traceEvents": [
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5000},  # host work: not counted
        kernel("gemm", 100, 50),  # 100-150
        kernel("norm", 150, 10),  # 150-160, adjacent: no gap
        kernel("side", 155, 30, stream=9),  # 155-185 on another stream: overlaps, extends the busy run
        kernel("memset", 190, 2, cat="gpu_memset"),  # a 5 us gap: below the 10 us floor
        kernel("attn", 260, 40),  # a 68 us gap after the memset
        kernel("copy", 1600, 100, cat="gpu_memcpy"),  # a 1300 us gap: the pass boundary
        kernel("gemm", 1712, 88),  # a 12 us gap
        {"ph": "i", "cat": "kernel", "name": "marker", "ts": 1800},  # not a complete event
    ]
}


def test_busy_runs_merge_streams_and_gaps_are_sized():
    s = gap_summary(device_activities(TRACE))
    assert s["activities"] == 7
    assert s["span_us"] == 1700.0  # 100 .. 1800
    assert s["busy_us"] == 85 + 2 + 40 + 100 + 88
    assert s["idle_us"] == 5 + 68 + 1300 + 12
    assert s["idle_us_counted"] == 68 + 1300 + 12
    assert s["by_size"]["10-50 us"] == {"gaps": 1, "idle_us": 12.0}
    assert s["by_size"]["50-200 us"] == {"gaps": 1, "idle_us": 68.0}
    assert s["by_size"][">= 1000 us"] == {"gaps": 1, "idle_us": 1300.0}
    assert s["largest"][0] == {"gap_us": 1300.0, "after": "attn", "before": "copy"}
    assert [g["gap_us"] for g in s["largest"]] == [1300.0, 68.0, 12.0]


def test_an_empty_trace_says_so(capsys, tmp_path):
    assert gap_summary(device_activities({"traceEvents": []})) == {"activities": 0}
    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"traceEvents": []}))
    main([str(path)])
    assert "no device activity" in capsys.readouterr().out


def test_the_command_reads_gzip(capsys, tmp_path):
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(TRACE, f)
    assert read_trace(path) == TRACE
    main([str(path), "--top", "1"])
    out = capsys.readouterr().out
    assert (
        "idle 1385.0 us" in out
        and "1300.0 us after attn / before copy" in out
        and "68.0 us" not in out.split("largest")[1]
    )
