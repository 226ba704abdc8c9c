"""JSON schemas the structured-output tests constrain generation with (nested objects, arrays
with bounds, enums, required and optional fields, numbers with ranges, string patterns, refs).
Strings and arrays are mostly bounded so that a random model finishes them within max_tokens."""

SHORT = {"type": "string", "maxLength": 6}

SCHEMAS = [
    {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False},
    {
        "type": "object",
        "properties": {"name": SHORT, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2, "maxItems": 4},
    {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}},
        "required": ["color"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
        "required": ["zip"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "note": SHORT},
        "required": ["ok"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"x": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["x"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "outer": {
                "type": "object",
                "properties": {
                    "inner": {
                        "type": "object",
                        "properties": {"v": {"type": "integer", "minimum": 1, "maximum": 9}},
                        "required": ["v"],
                        "additionalProperties": False,
                    }
                },
                "required": ["inner"],
                "additionalProperties": False,
            }
        },
        "required": ["outer"],
        "additionalProperties": False,
    },
    {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99}},
            "required": ["id"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 3,
    },
    {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
        "required": ["tags"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"kind": {"const": "point"}, "x": {"type": "integer", "minimum": -10, "maximum": 10}},
        "required": ["kind", "x"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "null"}]}},
        "required": ["value"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{2}$"},
            "n": {"type": "integer", "exclusiveMinimum": 0, "maximum": 5},
        },
        "required": ["code", "n"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "$defs": {
            "p": {
                "type": "object",
                "properties": {"q": {"enum": [1, 2, 3]}},
                "required": ["q"],
                "additionalProperties": False,
            }
        },
        "properties": {"first": {"$ref": "#/$defs/p"}, "second": {"$ref": "#/$defs/p"}},
        "required": ["first", "second"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 9},
            "opt": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["id"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}, "maxItems": 2},
    {
        "type": "object",
        "properties": {"word": {"type": "string", "minLength": 2, "maxLength": 4, "pattern": "^[a-z]+$"}},
        "required": ["word"],
        "additionalProperties": False,
    },
    {"enum": ["yes", "no", 0, None]},
    {
        "type": "object",
        "properties": {"score": {"type": "number", "minimum": -1.5, "maximum": 2.5}, "label": {"enum": ["pos", "neg"]}},
        "required": ["score", "label"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "matrix": {
                "type": "array",
                "items": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 0, "maximum": 3},
                    "minItems": 2,
                    "maxItems": 2,
                },
                "minItems": 2,
                "maxItems": 2,
            }
        },
        "required": ["matrix"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"name": SHORT, "email": {"type": "string", "pattern": "^[a-z]{1,5}@[a-z]{1,5}\\.com$"}},
                "required": ["name", "email"],
                "additionalProperties": False,
            }
        },
        "required": ["user"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "status": {"type": "string", "enum": ["open", "closed"]},
            "count": {"type": "integer", "minimum": 0, "maximum": 1000},
        },
        "required": ["status", "count"],
        "additionalProperties": False,
    },
]
