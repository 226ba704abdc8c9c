"""The gauges the inference gateway's endpoint picker reads (its model-server protocol): under
``stepserve:`` always, and with ``--metrics-compat vllm`` also under vLLM's names, equal."""

import re

import pytest

from stepserve.config import ConfigError
from stepserve.core.engine_core import EngineStats
from stepserve.server.config import ServerConfig
from stepserve.server.metrics import ServerMetrics

STATS = EngineStats(3, 5, 0.25, 100, 40, 1, ("a",), ("b", "c"), num_kv_blocks=1025, block_size=16)
PICKER = ("num_requests_waiting", "num_requests_running", "kv_cache_usage_perc", "cache_config_info")


def samples(text: str) -> dict[tuple[str, str], float]:
    """(name, labels) -> value of every sample line."""
    out = {}
    for line in text.splitlines():
        match = re.fullmatch(r"(\S+?)(?:\{(.*)\})? (\S+)", line)
        if match and not line.startswith("#"):
            out[(match[1], match[2] or "")] = float(match[3])
    return out


def render(compat: str, stats: EngineStats = STATS, max_loras: int = 2) -> dict:
    return samples(ServerMetrics("m", lambda: stats, max_loras=max_loras, compat=compat).render().decode())


def test_vllm_names_copy_the_picker_gauges():
    got = render("vllm")
    ours = {
        (name.removeprefix("stepserve:"), labels): v
        for (name, labels), v in got.items()
        if name.startswith("stepserve:")
    }
    theirs = {(name.removeprefix("vllm:"), labels): v for (name, labels), v in got.items() if name.startswith("vllm:")}
    assert {name for name, _ in theirs} == {*PICKER, "lora_requests_info"}
    assert theirs == {key: ours[key] for key in theirs}
    assert got[("vllm:num_requests_waiting", 'model_name="m"')] == 5
    assert got[("vllm:num_requests_running", 'model_name="m"')] == 3
    assert got[("vllm:kv_cache_usage_perc", 'model_name="m"')] == 0.25
    assert got[("vllm:cache_config_info", 'block_size="16",num_gpu_blocks="1025"')] == 1
    lora = 'max_lora="2",running_lora_adapters="a",waiting_lora_adapters="b,c"'
    assert got[("vllm:lora_requests_info", lora)] == got[("stepserve:lora_requests_info", lora)] > 0


def test_no_vllm_names_by_default_and_no_lora_info_without_adapters():
    got = render("none", max_loras=0)
    assert not any(name.startswith("vllm:") for name, _ in got)
    assert ("stepserve:cache_config_info", 'block_size="16",num_gpu_blocks="1025"') in got
    assert not any(name.endswith("lora_requests_info") for name, _ in got)


def test_cache_info_waits_for_the_core():
    empty = EngineStats(0, 0, 0.0, 0, 0, 0)
    assert not any(name.endswith("cache_config_info") for name, _ in render("vllm", empty))


def test_metrics_compat_is_checked():
    with pytest.raises(ConfigError, match="metrics_compat"):
        ServerConfig(metrics_compat="sglang")
