"""``stepserve.bench.gpu``'s summary: HTTP at 256 streams over the offline figure of the same run
(issue 33's 0.95 target), computed from the run's results without a GPU."""

import pytest
import torch

from stepserve.bench import gpu


@pytest.fixture(autouse=True)
def no_gpu_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "a test card")


def results(offline: float | None, served: float | None) -> dict:
    out: dict = {"date": "2026-12-07"}
    if offline is not None:
        out["stepserve_8b"] = {"out_tok_s": offline}
    if served is not None:
        out["serve_8b"] = {
            "streams_256": {"output_throughput": served, "ttft_ms": {"mean": 1850.0}},
            "streams_1": {"tpot_ms": {"mean": 6.14}},
            "restart_s": 5.5,
        }
    return out


def test_http_over_offline_is_their_quotient_in_one_run():
    r = results(9338.2, 8709.7)
    s = gpu.summary(r)
    assert s["serve_8b_over_offline"] == round(8709.7 / 9338.2, 3) == 0.933
    row = next(line for line in gpu.table(s, r).splitlines() if "256 streams" in line)
    assert "0.933 of offline in this run (target 0.95)" in row


@pytest.mark.parametrize("offline, served", [(None, 8709.7), (9338.2, None)])
def test_no_ratio_without_both_figures(offline, served):
    assert gpu.summary(results(offline, served))["serve_8b_over_offline"] is None
