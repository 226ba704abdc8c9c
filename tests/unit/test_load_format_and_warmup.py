"""``--load-format dummy`` on the CPU, the startup warm-up's workload, the compilation cache
folder, ``--quantization fp8`` refused where it cannot run, the GPU benchmark's tokenizer, and a
model build that imports nothing heavy."""

import pytest
import torch

from stepserve import LLM, SamplingParams
from stepserve.config import ConfigError, EngineConfig


def test_dummy_weights_need_no_files(tiny_llama, tmp_path):
    import shutil

    for f in tiny_llama.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, tmp_path / f.name)
    llm = LLM(model=str(tmp_path), device="cpu", load_format="dummy", seed=1, max_model_len=128)
    out = llm.generate([[3, 4, 5] * 4], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 6
    with pytest.raises(ConfigError, match="load_format"):
        EngineConfig.from_kwargs(load_format="pt")
    # The command line's model lookup too: `stepserve serve --load-format dummy` on such a folder
    # (the GPU benchmark's server run), and without dummy the missing weights are refused.
    from stepserve.cli import build_parser
    from stepserve.checkpoint.source import locate_from_args

    args = build_parser().parse_args(["serve", "--model", str(tmp_path), "--load-format", "dummy"])
    assert locate_from_args(args).path == str(tmp_path)
    with pytest.raises(ConfigError, match="no .safetensors weights"):
        locate_from_args(build_parser().parse_args(["serve", "--model", str(tmp_path)]))


def test_building_a_model_imports_no_dynamo(tiny_llama):
    """In a fresh process, building a model (meta device, then its memory and weights) leaves
    torch._dynamo unimported: Embedding's random init on the meta device had imported it, seconds
    of every restart."""
    import subprocess
    import sys

    script = (
        "import sys, torch\n"
        "from stepserve.models.loader import load_model, open_checkpoint\n"
        f"c = open_checkpoint({str(tiny_llama)!r})\n"
        "load_model(c.source, c.hf_config, torch.float32, torch.device('cpu'), 64, load_format='dummy')\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_fill_dummy_shapes_values_and_seed(tiny_llama):
    import json

    from stepserve.models.loader import ModelSource, load_model

    hf = json.loads((tiny_llama / "config.json").read_text())

    def build(seed):
        return load_model(
            ModelSource(tiny_llama, None, "x"),
            hf,
            torch.float32,
            torch.device("cpu"),
            64,
            load_format="dummy",
            seed=seed,
        )

    model, same, other = build(5), build(5), build(6)
    w = model.layers[0].mlp.down_proj.weight
    assert 0.015 < w.std().item() < 0.025 and torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))
    assert torch.equal(w, same.layers[0].mlp.down_proj.weight) and not torch.equal(
        w, other.layers[0].mlp.down_proj.weight
    )


def test_warmup_lengths_fit_the_context_and_span_a_chunk():
    from stepserve.engine.warmup import _prompt_lengths

    for max_len, max_tokens, chunk, seqs in (
        (1024, 19, 8192, 256),
        (512, 11, 4096, 16),
        (64, 5, 64, 2),
        (4096, 3, 512, 256),
    ):
        lengths = _prompt_lengths(max_len, max_tokens, chunk, seqs)
        assert 1 <= len(lengths) <= seqs
        assert all(1 <= n <= max_len - max_tokens for n in lengths)
    big = _prompt_lengths(1024, 19, 8192, 256)
    assert sum(big[len(big) // 2 :]) > 8192 and {n % 16 == 0 for n in big} == {True, False}


def test_compilation_cache_dir(tmp_path, monkeypatch):
    from stepserve.worker.compile_cache import default_cache_dir, use_compilation_cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    assert default_cache_dir() == tmp_path / "xdg" / "stepserve" / "compile"
    path = use_compilation_cache(str(tmp_path / "cc"))
    import os

    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "cc" / "triton") and (path / "triton").is_dir()


def test_fp8_is_refused_on_cpu(tiny_llama):
    with pytest.raises(ConfigError, match="fp8"):
        LLM(model=str(tiny_llama), device="cpu", quantization="fp8")


@pytest.mark.parametrize("bos, eos", [(2990, 2991), (2, 1)])  # Llama's high ids, Gemma's low ones
def test_bench_tokenizer_covers_the_vocabulary(tmp_path, bos, eos):
    from transformers import AutoTokenizer

    from stepserve.bench.gpu_serve import write_vocab_tokenizer

    write_vocab_tokenizer(tmp_path, 3000, bos, eos)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == 3000 and tok.eos_token_id == eos and tok.bos_token_id == bos
    assert len(tok.encode("the of and to in is you")) == 7  # one token a word
    assert all(tok.decode([i]) for i in range(0, 3000, 97))


def test_warm_up_runs_every_pass_kind_and_leaves_the_engine_idle(tiny_llama):
    """The startup workload (run on CUDA only) through a CPU engine: it finishes, frees its
    blocks (prefix-cached ones stay evictable), and later requests still run."""
    from stepserve.engine.warmup import warm_up

    llm = LLM(
        model=str(tiny_llama),
        device="cpu",
        max_model_len=128,
        max_num_seqs=8,
        max_num_batched_tokens=64,
        num_scheduler_steps=2,
    )
    core = llm.core
    free = core.scheduler.blocks.num_free_blocks
    warm_up(core, 320, 128, 2, 8, 64, token_budget=4000)
    assert not core.has_unfinished and core.scheduler.blocks.num_free_blocks == free
    out = llm.generate([[3, 4, 5]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3
