"""Console output for a person at the keyboard (issue 18): the weights progress bar on a
terminal, the stats line's figures, and --disable-playground."""

import io
import logging

from fastapi.testclient import TestClient

from stepserve.core.engine_core import EngineStats
from stepserve.models.load_progress import LoadProgress
from stepserve.server.stats_log import StatsSample, format_line, is_idle


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def shard(n: int):
    import torch

    return ((f"w{i}", torch.zeros(4)) for i in range(n))


def consume(progress: LoadProgress, sizes: list[int]) -> int:
    return sum(1 for i, n in enumerate(sizes) for _ in progress.shard(i, f"part{i}", n, shard(n)))


def test_a_terminal_gets_a_bar_over_tensors_and_shards(caplog):
    screen = Terminal()
    with caplog.at_level(logging.INFO, "stepserve.loader"):
        assert consume(LoadProgress(2, 5, stream=screen), [3, 2]) == 5
    text = screen.getvalue()
    assert "Loading weights" in text and "5/5" in text and "shard 2/2" in text
    assert not caplog.records  # the bar, not log lines


def test_a_log_gets_one_line_per_shard(caplog):
    with caplog.at_level(logging.INFO, "stepserve.loader"):
        assert consume(LoadProgress(2, stream=io.StringIO()), [3, 2]) == 5
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" (")[0] for line in lines] == ["loaded weights shard 1/2", "loaded weights shard 2/2"]
    assert "part0): 3 tensors" in lines[0] and "part1): 2 tensors" in lines[1]


def sample(t, prompt, gen, running=0, waiting=0, usage=0.0, queries=0, hits=0, restarts=0):
    return StatsSample(t, prompt, gen, EngineStats(running, waiting, usage, queries, hits, 0), restarts)


def test_stats_line_reports_rates_over_the_interval():
    line = format_line(sample(100.0, 10, 50), sample(110.0, 210, 450, 3, 2, 0.125, 400, 100, 1))
    assert line == (
        "Avg prompt throughput: 20.0 tokens/s, Avg generation throughput: 40.0 tokens/s, Running: 3 reqs, "
        "Waiting: 2 reqs, KV cache usage: 12.5%, Prefix cache hit rate: 25.0%, Engine restarts: 1"
    )


def test_idle_means_nothing_moved_and_nothing_in_flight():
    assert is_idle(sample(0, 5, 5), sample(10, 5, 5))
    assert not is_idle(sample(0, 5, 5), sample(10, 5, 6))
    assert not is_idle(sample(0, 5, 5), sample(10, 5, 5, waiting=1))


def app(**server_options):
    from stepserve.engine.front import FrontInfo
    from stepserve.server.app import create_app
    from stepserve.server.config import ServerConfig

    info = FrontInfo("m", 64, 100, frozenset({0}))
    return create_app(lambda: None, None, info, ServerConfig(**server_options), max_running=1)


def test_the_playground_is_served_at_the_root_unless_disabled():
    page = TestClient(app()).get("/")  # no lifespan: the engine is not needed for static files
    assert page.status_code == 200 and "stepserve playground" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert TestClient(app()).get("/playground/playground.js").status_code == 200
    assert TestClient(app()).get("/playground/../server.py").status_code == 404
    assert TestClient(app(disable_playground=True)).get("/").status_code == 404
