"""FP8 checkpoints (``compressed-tensors`` and vLLM's ``fp8``): a tiny Llama's projections are
quantized here to e4m3 with per-tensor, per-channel and per-block scales and saved in each
format; stepserve's model of that checkpoint must hold the weights that this test dequantizes
itself (q * scale, written out below), and generate transformers' greedy tokens on a plain
checkpoint of those dequantized weights. Quantizations it does not read are refused by name."""

import json
import logging
import shutil

import pytest
import torch
import transformers
from fp8_checkpoints import write_fp8
from references import reference_greedy
from safetensors.torch import load_file, save_file

from stepserve import LLM, SamplingParams
from stepserve.config import ConfigError

CASES = [
    ("compressed-tensors", "channel", False),
    ("compressed-tensors", "tensor", True),
    ("compressed-tensors", "block", False),
    ("fp8", "tensor", False),
    ("fp8", "block", True),
]


@pytest.mark.parametrize("method,strategy,scales_first", CASES)
def test_fp8_checkpoint_equals_its_dequantized_weights(tiny_llama, tmp_path, method, strategy, scales_first, caplog):
    fp8_dir, plain_dir, plain = write_fp8(tiny_llama, tmp_path / "fp8", method, strategy, scales_first)
    with caplog.at_level(logging.WARNING, logger="stepserve"):
        llm = LLM(model=str(fp8_dir), dtype="float32", num_blocks=128, block_size=4, max_model_len=128)
    assert llm.info.quantization == "none"  # on a CPU it runs dequantized
    if method == "compressed-tensors":
        assert "input_scale tensors are not read" in caplog.text
    layer = llm.core.worker.model.layers[0]
    q, k, v = (
        plain["model.layers.0.self_attn.q_proj.weight"],
        plain["model.layers.0.self_attn.k_proj.weight"],
        plain["model.layers.0.self_attn.v_proj.weight"],
    )
    assert torch.equal(layer.self_attn.qkv_proj.weight, torch.cat([q, k, v]))
    assert torch.equal(layer.mlp.down_proj.weight, plain["model.layers.0.mlp.down_proj.weight"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float32).eval()
    for prompt in ([5, 17, 99, 3], list(range(40, 70))):
        got = (
            llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
            .outputs[0]
            .token_ids
        )
        assert got == reference_greedy(hf, prompt, 12)


@pytest.mark.parametrize(
    "quant,message",
    [
        ({"quant_method": "gptq", "bits": 4}, "quantization method 'gptq' is not supported"),
        ({"quant_method": "fp8", "fmt": "e5m2"}, "fmt='e5m2'"),
        (
            {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {}},
            "format 'pack-quantized'",
        ),
        (
            {
                "quant_method": "compressed-tensors",
                "format": "naive-quantized",
                "config_groups": {"g": {"weights": {"num_bits": 8, "type": "int", "strategy": "channel"}}},
            },
            "8-bit int weights are not supported",
        ),
        (
            {
                "quant_method": "compressed-tensors",
                "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float", "strategy": "group"}}},
            },
            "weight strategy 'group'",
        ),
    ],
)
def test_other_quantizations_are_refused_by_name(tiny_llama, tmp_path, quant, message):
    directory = tmp_path / "model"
    shutil.copytree(tiny_llama, directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "quantization_config": quant}))
    with pytest.raises(ConfigError, match=message):
        LLM(model=str(directory), dtype="float32", num_blocks=64, block_size=4, max_model_len=64)


def test_a_weight_without_its_scale_is_refused(tiny_llama, tmp_path):
    fp8_dir, _, _ = write_fp8(tiny_llama, tmp_path / "fp8", "compressed-tensors", "channel")
    tensors = load_file(fp8_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight_scale"]
    save_file(tensors, fp8_dir / "model.safetensors")
    with pytest.raises(ConfigError, match=r"do not pair up, e.g. \['model.layers.1.mlp.up_proj'\]"):
        LLM(model=str(fp8_dir), dtype="float32", num_blocks=64, block_size=4, max_model_len=64)
