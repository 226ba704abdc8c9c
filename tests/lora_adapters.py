"""PEFT LoRA adapters of the tiny test models, made by ``peft`` itself (no hub): random A and B
(``init_lora_weights=False``), so each adapter really moves the model's answers."""

from __future__ import annotations

from pathlib import Path

# name -> (rank, alpha, targets, use_rslora)
ADAPTERS = {
    "attn-r8": (8, 16, ["q_proj", "v_proj"], False),
    "all-r16-rslora": (16, 8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], True),
    "mlp-r4": (4, 4, ["gate_proj", "down_proj"], False),
}


FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj"}  # Phi-3's fused modules
FUSED |= {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


def write_adapter(base_dir: Path, directory: Path, name: str, seed: int = 0) -> Path:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    rank, alpha, targets, rslora = ADAPTERS[name]
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    modules = {module_name.rsplit(".", 1)[-1] for module_name, _ in model.named_modules()}
    if "qkv_proj" in modules:  # Phi-3 stores q/k/v and gate/up fused: peft adapts the fused modules
        targets = sorted({FUSED.get(t, t) for t in targets})
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, init_lora_weights=False)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # peft's random init is small: scale B so the adapter changes greedy answers
        for param_name, param in peft_model.named_parameters():
            if "lora_B" in param_name:
                param.mul_(4.0)
    peft_model.save_pretrained(directory)
    return directory


def merged_greedy(
    base_dir: Path, adapter_dir: Path | None, prompts: list[list[int]], new_tokens: int
) -> list[list[int]]:
    """transformers' greedy tokens of the base model with the adapter merged by peft."""
    import torch
    import transformers
    from peft import PeftModel

    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    model.eval()
    out = []
    for ids in prompts:
        gen = model.generate(
            torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        out.append(gen[0, len(ids) :].tolist())
    return out


def base_and_requests(directory: Path, family: str) -> tuple[Path, list]:
    """A tiny random base of ``family`` (Llama, or a ``write_tiny_family`` name) under
    ``directory``, and a ``LoRARequest`` for each adapter of ``ADAPTERS`` peft can write on it (on
    a mixture, not the MLP-only one: peft adapts the stacked gate and up together or not at all)."""
    from tiny_models import write_tiny_family, write_tiny_model

    from stepserve import LoRARequest

    if family == "llama":
        base = write_tiny_model(directory / "base", "llama", seed=3)
    else:
        base = write_tiny_family(directory / "base", family, seed=3)
    names = [n for n in ADAPTERS if not (family.endswith("-moe") and n == "mlp-r4")]
    requests = [
        LoRARequest(name, i + 1, str(write_adapter(base, directory / name, name, seed=i)))
        for i, name in enumerate(names)
    ]
    return base, requests
