"""A 60-second soak (``stepserve bench soak``): a mixed load with disconnects, client aborts,
bad inputs and bursts past the admission limit leaves nothing behind: no 5xx or dropped
connection, KV usage 0 and nothing running at rest, file descriptors back where they started,
and every request ended exactly once."""

from stepserve.bench import soak


def test_a_minute_of_mixed_load_leaves_nothing_behind(tiny_llama, tmp_path):
    serve_args = [
        "--model",
        str(tiny_llama),
        "--max-model-len",
        "256",
        "--num-blocks",
        "512",
        *soak.DEFAULT_SERVE_ARGS.split(),
    ]
    report = soak.run(60, serve_args, log_path=tmp_path / "server.log")
    print("\n".join(report.lines()))
    assert not report.problems
    assert report.kv_usage_at_rest == 0 and report.running_at_rest == 0
    assert report.ended_exactly_once and report.finished_lines > 0
    assert all(report.fds_back(process) for process in ("server", "core"))
    assert report.server_exit_code == 0
    assert all(len(report.rss_series[process]) >= 10 for process in ("server", "core"))
    for outcome in ("stream 200", 200, 400, 429, "disconnected mid-stream", "aborted by client"):
        assert report.outcomes[outcome] > 0, (outcome, report.outcomes)
    assert report.ok
