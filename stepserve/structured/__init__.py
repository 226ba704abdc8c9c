"""Constrained decoding and tool calls: grammar compilation and checks (front end, ``compiler``),
per-request matchers and token bitmasks (engine core, ``bitmask``), tool-call grammars and
parsers (``tools``, ``tool_parsers``). The grammar work is llguidance's (docs/structured-output.md)."""
