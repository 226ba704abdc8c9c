"""Check stepserve's EAGLE-3 heads against vLLM's: the same tiny random target and head, greedy,
in both engines; every proposal vLLM makes is compared with the reference head of the tests
(``tests/eagle3_reference.py``), and stepserve's proposals with vLLM's at the contexts both
proposed at.

    .venv/bin/python tools/eagle3_vllm_parity.py --vllm-python PEERS/venv-vllm/bin/python [--layout speculators]

vLLM runs in its own environment (its CPU build, ``../shared/peers/README.md``), in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that its model runner's drafts can be recorded. Its CPU
attention needs a head size of 32 or more: the target here is wider than the tests' one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPTS = [list(b"the cat sat on the mat; the cat"), list(b"abcabcabcab"), list(b"1 2 3 4 5 6 7 8 9 1")]
MAX_TOKENS = 20

VLLM_SIDE = """
import json, sys
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.v1.worker import gpu_model_runner as runner

seen = []
take = runner.GPUModelRunner.take_draft_token_ids

def recording(self):
    out = take(self)
    if out is not None:
        batch = self.input_batch
        for rid, drafts in zip(out.req_ids, out.draft_token_ids):
            i = batch.req_id_to_index.get(rid)
            if i is not None:
                n = int(batch.num_tokens_no_spec[i])
                seen.append((batch.token_ids_cpu[i, :n].tolist(), [int(d) for d in drafts]))
    return out

runner.GPUModelRunner.take_draft_token_ids = recording
target, head, prompts, max_tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
llm = LLM(model=target, dtype="float32", max_model_len=256, enforce_eager=True, skip_tokenizer_init=True,
          async_scheduling=False, speculative_config={"method": "eagle3", "model": head, "num_speculative_tokens": 3})
params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
print("RESULT " + json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outs], "seen": seen}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm-python", required=True, help="the Python of an environment with vLLM")
    parser.add_argument("--layout", choices=["eagle", "speculators"], default="eagle")
    parser.add_argument(
        "--aux-layers",
        default="0,1,2",
        help="the target layers the head reads (the target has 3; 3 reads the last one's output)",
    )
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "tests"))
    import torch
    from eagle3_reference import Reference, record_proposals
    from tiny_models import write_eagle3_head, write_tiny_model

    from stepserve import LLM, SamplingParams

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="eagle3-parity-"))
    target = write_tiny_model(
        work / "target", "llama", seed=3, num_hidden_layers=3, hidden_size=128, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=256,
    )  # fmt: skip
    draft_vocab = 200 if args.layout == "eagle" else None
    aux = tuple(int(i) for i in args.aux_layers.split(","))
    head = write_eagle3_head(work / "head", target, seed=7, layout=args.layout, draft_vocab=draft_vocab, aux_layers=aux)
    env = os.environ | {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    env |= {"VLLM_HOST_IP": "127.0.0.1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    run = subprocess.run(
        [args.vllm_python, "-c", VLLM_SIDE, str(target), str(head), json.dumps(PROMPTS), str(MAX_TOKENS)],
        capture_output=True, text=True, env=env, cwd=work,
    )  # fmt: skip
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        print(run.stdout[-3000:], run.stderr[-3000:], sep="\n")
        return 1
    vllm = json.loads(lines[0].removeprefix("RESULT "))
    reference = Reference(target, head)
    equal = sum(reference.proposals(tokens, len(drafts)) == drafts for tokens, drafts in vllm["seen"])
    print(f"vLLM's proposals equal to the reference head's: {equal} of {len(vllm['seen'])}")
    config = {"method": "eagle3", "model": str(head), "num_speculative_tokens": 3}
    llm = LLM(model=str(target), dtype="float32", max_model_len=256, speculative_config=config)
    seen = record_proposals(llm)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    tokens = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params)]
    print(f"greedy tokens equal to vLLM's: {tokens == vllm['tokens']}")
    theirs = {tuple(t): d for t, d in vllm["seen"]}
    common = [(t, d) for t, d in seen if tuple(t) in theirs]
    same = sum(d == theirs[tuple(t)][: len(d)] for t, d in common)
    print(f"stepserve's proposals equal to vLLM's where both proposed: {same} of {len(common)}")
    ok = equal == len(vllm["seen"]) and tokens == vllm["tokens"] and same == len(common) and common
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
