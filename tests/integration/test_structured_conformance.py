"""The conformance corpus (tests/data/structured_corpus.json: 78 JSON schemas as pydantic, the
openai SDK's ``parse``, LangChain and agent frameworks send them) through stepserve, with the
verdicts docs/structured-output.md reports:

- every schema compiles on the request's own path but those whose keywords no grammar can
  enforce (``uniqueItems``), which are 400s naming the keyword;
- the grammar takes every valid instance and refuses every invalid one;
- on the embedded model (temperature 0 and 0.8, through ``tools/structured_conformance.py``,
  the client that also ran vLLM for the table), every answer that is not cut by max_tokens is
  valid under ``jsonschema``, and strict formats and forced tools carry no undeclared property.
"""

import importlib.util
import json
from pathlib import Path

import jsonschema
import pytest
from byte_grammar import accepts
from live_server import start_server

from stepserve.kernels.cpu import native as cpu_native
from stepserve.errors import InvalidRequestError
from stepserve.server.config import ServerConfig
from stepserve.server.context import ServingContext
from stepserve.server.plan import plan_chat
from stepserve.server.schemas import ChatCompletionRequest, validate
from stepserve.structured.compiler import GrammarCompiler
from stepserve.structured.json_schema import prepare_schema

ROOT = Path(__file__).resolve().parents[2]
CORPUS = json.loads((ROOT / "tests/data/structured_corpus.json").read_text())
REFUSED = {"pyd_array_bounds_unique_tags": "uniqueItems", "mcp_git_commit": "uniqueItems"}


def _tool():
    spec = importlib.util.spec_from_file_location("structured_conformance", ROOT / "tools/structured_conformance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compact(instance) -> str:
    return json.dumps(instance, separators=(",", ":"), ensure_ascii=False)


def _closed(entry) -> bool:
    req = entry["request"]
    return "tools" in req or bool(req["response_format"]["json_schema"].get("strict"))


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    from tiny_models import save_byte_tokenizer
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("tok")
    save_byte_tokenizer(directory)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    return ServingContext(
        None, tokenizer, "m", 4096, 320, ServerConfig(), grammars=GrammarCompiler(tokenizer, 320, {256})
    )


def test_the_corpus_is_what_it_says():
    assert len(CORPUS) >= 60 and len({e["id"] for e in CORPUS}) == len(CORPUS)
    tool = _tool()
    for entry in CORPUS:
        _, schema = tool.entry_kind_and_schema(entry)
        validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
        assert all(validator.is_valid(v) for v in entry["valid"]), entry["id"]
        assert not any(validator.is_valid(v) for v in entry["invalid"]), entry["id"]


@pytest.mark.parametrize("entry", CORPUS, ids=[e["id"] for e in CORPUS])
def test_grammar_verdicts(ctx, entry):
    req = validate(
        ChatCompletionRequest, {"messages": [{"role": "user", "content": entry["prompt"]}]} | entry["request"]
    )
    if entry["id"] in REFUSED:
        with pytest.raises(InvalidRequestError) as err:
            plan_chat(ctx, req)
        assert REFUSED[entry["id"]] in err.value.message
        return
    grammar = plan_chat(ctx, req).inputs[0].params.structured.grammar
    for instance in entry["valid"]:
        assert accepts(grammar, _compact(instance)), instance
    for instance in entry["invalid"]:
        assert not accepts(grammar, _compact(instance)), instance


@pytest.mark.slow
def test_embedded_model_answers_are_valid(tmp_path):
    server = start_server(
        ["--model_name", "smollm2", "--max-model-len", "2048", "--num-scheduler-steps", "8"], tmp_path / "server.log"
    )
    out = tmp_path / "http.json"
    # Without stepserve's CPU kernels (no C compiler) the embedded model decodes through PyTorch,
    # several times slower: the corpus at temperature 0 alone keeps the test within its timeout.
    temperatures = (0.0, 0.8) if cpu_native.library() is not None else (0.0,)
    try:
        args = ["http", "--base-url", server.url + "/v1", "--model", "smollm2", "--out", str(out)]
        args += ["--corpus", str(ROOT / "tests/data/structured_corpus.json"), "--concurrency", "16"]
        args += ["--temperatures", *map(str, temperatures)]
        assert _tool().main(args) == 0
    finally:
        server.stop()
    records = json.loads(out.read_text())["records"]
    by_id = {e["id"]: e for e in CORPUS}
    tool = _tool()
    for temperature in temperatures:
        rows = [r for r in records if r["temperature"] == temperature]
        assert {r["id"] for r in rows if r["status"] == 400} == set(REFUSED)
        assert all(r["status"] in (200, 400) for r in rows)
        complete = [r for r in rows if r["status"] == 200 and not r["truncated"]]
        assert len(complete) >= len(rows) // 2  # most answers end within 256 tokens
        for r in complete:
            assert r["valid"], (r["id"], r["output"], r["validation_error"])
            entry = by_id[r["id"]]
            if _closed(entry):
                _, schema = tool.entry_kind_and_schema(entry)
                closed = prepare_schema(schema, closed=True, rewrite_patterns=False)
                jsonschema.validate(json.loads(r["output"]), closed)
