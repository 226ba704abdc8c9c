"""Models and settings stepserve does not implement are refused at startup with a message that
names them (exit code 2 and no traceback from the command line; ConfigError from ``LLM``)."""

import json
import shutil
import subprocess
import sys

import pytest

from stepserve import LLM
from stepserve.config import ConfigError

CASES = {  # id -> (config.json changes, what the message must contain)
    "architecture": (
        {"architectures": ["FalconForCausalLM"]},
        ["'FalconForCausalLM' is not supported", "Qwen3ForCausalLM", "Gemma3ForCausalLM"],
    ),
    "rope type": (
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_parameters": None},
        ["rope_scaling", "'yarn'", "longrope"],
    ),
    "rope params": (
        {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 10000.0}},
        ["rope_parameters", "low_freq_factor"],
    ),
    "quantization": (
        {"quantization_config": {"quant_method": "gptq", "bits": 4}},
        ["quantization method 'gptq' is not supported", "supported:"],
    ),
    "activation": ({"hidden_act": "relu2"}, ["hidden_act='relu2'", "supported:"]),
    "layer types": ({"layer_types": ["chunked_attention", "full_attention"]}, ["layer_types", "chunked_attention"]),
}


def variant(tiny_llama, tmp_path, changes: dict):
    target = tmp_path / "model"
    shutil.copytree(tiny_llama, target)
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return target


@pytest.mark.parametrize("case", CASES)
def test_llm_refuses(case, tiny_llama, tmp_path):
    changes, needles = CASES[case]
    with pytest.raises(ConfigError) as info:
        LLM(model=str(variant(tiny_llama, tmp_path, changes)))
    for needle in needles:
        assert needle in str(info.value)


@pytest.mark.parametrize("case", ["architecture", "quantization"])
def test_serve_exits_2_naming_it(case, tiny_llama, tmp_path):
    changes, needles = CASES[case]
    model = variant(tiny_llama, tmp_path, changes)
    run = subprocess.run(
        [sys.executable, "-m", "stepserve", "serve", "--model", str(model), "--http_port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    for needle in needles:
        assert needle in run.stderr
