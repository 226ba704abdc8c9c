"""FP8 checkpoints written for tests: a tiny model's projections quantized to e4m3 with
per-tensor, per-channel or per-block scales, in the ``compressed-tensors`` or vLLM's ``fp8``
format, beside a plain checkpoint of the same weights dequantized (q * scale, written out here)."""

import json
import shutil

import torch
from safetensors.torch import load_file, save_file

FP8_MAX = 448.0
BLOCK = (32, 32)


def quantize(w: torch.Tensor, strategy: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e4m3 codes, scale as the format stores it, the dequantized float32 weight)."""
    w = w.float()
    if strategy == "tensor":
        scale = w.abs().max() / FP8_MAX
        q = (w / scale).to(torch.float8_e4m3fn)
        return q, scale.reshape(1), q.float() * scale
    if strategy == "channel":
        scale = w.abs().amax(1, keepdim=True) / FP8_MAX  # [N, 1]
        q = (w / scale).to(torch.float8_e4m3fn)
        return q, scale, q.float() * scale
    rows, cols = BLOCK
    n, k = w.shape
    tiles = w.reshape(n // rows, rows, k // cols, cols)
    scale = tiles.abs().amax(dim=(1, 3)) / FP8_MAX  # [N / rows, K / cols]
    q = (tiles / scale[:, None, :, None]).to(torch.float8_e4m3fn)
    return q.reshape(n, k), scale, (q.float() * scale[:, None, :, None]).reshape(n, k)


def quant_config(method: str, strategy: str) -> dict:
    if method == "fp8":
        return {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            **({"weight_block_size": list(BLOCK)} if strategy == "block" else {}),
        }
    weights = {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False}
    if strategy == "block":
        weights["block_structure"] = list(BLOCK)
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "ignore": ["lm_head"],
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False},
            }
        },
    }


def write_fp8(src, dst, method: str, strategy: str, scales_first: bool = False):
    """``dst``: the FP8 checkpoint; ``dst``-plain: the same weights dequantized, unquantized."""
    tensors = load_file(src / "model.safetensors")
    codes, scales, plain = {}, {}, {}
    scale_name = "weight_scale_inv" if method == "fp8" and strategy == "block" else "weight_scale"
    for name, t in tensors.items():
        if name.endswith("_proj.weight"):
            q, scale, deq = quantize(t, strategy)
            prefix = name[: -len(".weight")]
            codes[name] = q
            scales[f"{prefix}.{scale_name}"] = scale.reshape(()) if method == "fp8" and strategy == "tensor" else scale
            if method == "compressed-tensors":
                scales[f"{prefix}.input_scale"] = torch.ones(1)  # static activation scales: not read
            plain[name] = deq
        else:
            codes[name] = plain[name] = t
    config = json.loads((src / "config.json").read_text())
    out = {}
    for directory, weights, quant in (
        (dst, None, quant_config(method, strategy)),
        (dst.with_name(dst.name + "-plain"), plain, None),
    ):
        shutil.copytree(src, directory)
        (directory / "model.safetensors").unlink()
        (directory / "config.json").write_text(
            json.dumps({**config, **({"quantization_config": quant} if quant else {})})
        )
        if weights is not None:
            save_file(weights, directory / "model.safetensors")
        elif scales_first:  # the scales' shard is read first: they wait for their weights
            save_file(scales, directory / "model-00001-of-00002.safetensors")
            save_file(codes, directory / "model-00002-of-00002.safetensors")
            files = {
                **{k: "model-00001-of-00002.safetensors" for k in scales},
                **{k: "model-00002-of-00002.safetensors" for k in codes},
            }
            (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": files}))
        else:
            save_file({**codes, **scales}, directory / "model.safetensors")
        out[quant is None] = directory
    return out[False], out[True], plain
