"""ECMA-262 regular expressions, rewritten for llguidance's regex engine (Rust's ``regex`` syntax).

Clients write patterns the way JSON Schema's ``pattern`` defines them and OpenAI's structured
outputs and vLLM (xgrammar) read them: as ECMA-262 (JavaScript) regexes. Rust's syntax looks the
same and means something else in places, the worst being that ``\\d`` is any Unicode decimal digit
(a small model found U+1FBF8, a "segmented digit", for a phone number). ``to_rust`` rewrites a
pattern so that it means what ECMA says:

- ``\\d`` is ``[0-9]``, ``\\w`` is ``[A-Za-z0-9_]``, ``\\s`` is ECMA's white space and line
  terminators, and their capitals the complements;
- ``.`` is any character but a line terminator (``\\n``, ``\\r``, U+2028, U+2029), or any
  character inside a ``(?s:...)`` modifier group;
- literals are written as ``\\x{...}`` where Rust's syntax would read them otherwise (``[[]``,
  ``a{``, ``]``, ``&&`` and ``--`` in classes), and ECMA's escapes (``\\cX``, ``\\0``, ``\\uXXXX``
  with surrogate pairs, ``\\u{...}``, ``[\\b]``) become the characters they name;
- ECMA-2025 modifier groups ``(?i:...)``, ``(?-i:...)`` (flags i, m, s) and named groups
  ``(?<name>...)`` are kept.

What no regular language can express, and what ECMA does not define, is refused with a message
naming it (``UnsupportedRegex``, a ``ValueError``): lookahead and lookbehind, backreferences,
word boundaries (``\\b``, ``\\B``), flags for the rest of a pattern (``(?i)``, not ECMA syntax),
Python's ``(?P<name>...)``, escapes ECMA does not define (``\\A``, ``\\z``, ``\\e``, ...) and lone
surrogates. Anchors (``^``, ``$``) pass through: llguidance takes them at the ends of the pattern
and reports any elsewhere.
"""

from __future__ import annotations

# ECMA-262's WhiteSpace and LineTerminator code points: what \s matches.
_SPACE_RANGES = (
    (0x09, 0x0D),
    (0x20, 0x20),
    (0xA0, 0xA0),
    (0x1680, 0x1680),
    (0x2000, 0x200A),
    (0x2028, 0x2029),
    (0x202F, 0x202F),
    (0x205F, 0x205F),
    (0x3000, 0x3000),
    (0xFEFF, 0xFEFF),
)
_DIGIT_RANGES = ((0x30, 0x39),)
_WORD_RANGES = ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A))
_CLASS_ESCAPES = {"d": _DIGIT_RANGES, "w": _WORD_RANGES, "s": _SPACE_RANGES}
_CONTROL_ESCAPES = {"t": 0x09, "n": 0x0A, "v": 0x0B, "f": 0x0C, "r": 0x0D}
_SYNTAX = set("^$\\.*+?()[]{}|/")
_MODIFIER_FLAGS = set("ims")
_NOT_LINE_TERMINATOR = "[^\\x{A}\\x{D}\\x{2028}\\x{2029}]"  # ECMA's . without the s flag


class UnsupportedRegex(ValueError):
    """A pattern that cannot be honoured as ECMA-262 defines it; the message names the part."""


def _hex(cp: int) -> str:
    return "\\x{%X}" % cp


def _ranges(ranges: tuple[tuple[int, int], ...]) -> str:
    return "".join(_hex(a) if a == b else f"{_hex(a)}-{_hex(b)}" for a, b in ranges)


def _literal(ch: str) -> str:
    """``ch`` as a Rust regex literal, safe inside and outside classes."""
    return ch if ch.isascii() and ch.isalnum() else _hex(ord(ch))


def _class_text(atom: int | str) -> str:
    return atom if isinstance(atom, str) else _hex(atom)


def to_rust(pattern: str) -> str:
    """``pattern`` (ECMA-262) in Rust ``regex`` syntax with the same meaning; ``UnsupportedRegex``
    when it uses something that cannot be honoured."""
    return _Translator(pattern).run()


class _Translator:
    def __init__(self, pattern: str) -> None:
        self.src = pattern
        self.pos = 0
        self.out: list[str] = []
        self.dotall = [False]  # the s flag, one entry per open group

    def fail(self, what: str) -> UnsupportedRegex:
        """``what`` at the current offset; ``what`` ends with its reason or is "not supported"."""
        reason = "" if " is " in what or " are " in what else " is not supported"
        return UnsupportedRegex(f"{what}{reason} (offset {self.pos} of the pattern)")

    def peek(self, n: int = 1) -> str:
        return self.src[self.pos : self.pos + n]

    def run(self) -> str:
        while self.pos < len(self.src):
            ch = self.src[self.pos]
            if ch == "\\":
                self.out.append(self.escape(in_class=False))
            elif ch == "[":
                self.out.append(self.char_class())
            elif ch == "(":
                self.out.append(self.group_open())
            elif ch == ")":
                if len(self.dotall) == 1:
                    raise UnsupportedRegex(f"unbalanced ')' at offset {self.pos} of the pattern")
                self.dotall.pop()
                self.pos += 1
                self.out.append(")")
            elif ch == ".":
                self.pos += 1
                self.out.append("(?s:.)" if self.dotall[-1] else _NOT_LINE_TERMINATOR)
            elif ch == "{":
                self.out.append(self.brace())
            elif ch in "]}":
                self.pos += 1
                self.out.append(_hex(ord(ch)))  # a lone ] or } is a literal in ECMA
            elif ch in "^$|*+?":
                self.pos += 1
                self.out.append(ch)
            else:
                self.pos += 1
                self.out.append(_literal(ch))
        if len(self.dotall) > 1:
            raise UnsupportedRegex("unbalanced '(' in the pattern")
        return "".join(self.out)

    # -- pieces ------------------------------------------------------------------------

    def brace(self) -> str:
        """A quantifier ``{n}``, ``{n,}``, ``{n,m}``, or a literal ``{`` (Annex B)."""
        end = self.src.find("}", self.pos)
        body = self.src[self.pos + 1 : end] if end > 0 else ""
        low, comma, high = body.partition(",")
        if end > 0 and low.isdigit() and (not high or high.isdigit()):
            self.pos = end + 1
            return "{" + body + "}"
        self.pos += 1
        return _hex(ord("{"))

    def group_open(self) -> str:
        self.pos += 1
        dotall = self.dotall[-1]
        if self.peek() != "?":
            self.dotall.append(dotall)
            return "("
        head = self.peek(3)
        if head[:2] in ("?=", "?!"):
            raise self.fail("lookahead (" + head[:2] + ")")
        if head in ("?<=", "?<!"):
            raise self.fail("lookbehind (" + head + ")")
        if head[:2] == "?:":
            self.pos += 2
            self.dotall.append(dotall)
            return "(?:"
        if head[:2] == "?<":
            end = self.src.find(">", self.pos)
            name = self.src[self.pos + 2 : end] if end > 0 else ""
            if not name or not all(c.isalnum() or c == "_" for c in name) or not (name[0].isalpha() or name[0] == "_"):
                raise self.fail("a malformed group name")
            self.pos = end + 1
            self.dotall.append(dotall)
            return f"(?<{name}>"
        if head[:2] == "?P":
            raise self.fail("Python's named group (?P<name>...) is not ECMA-262 syntax: write (?<name>...)")
        return self.modifiers(dotall)

    def modifiers(self, dotall: bool) -> str:
        """ECMA-2025 modifier group ``(?ims-ims:...)``."""
        end = self.pos + 1
        while end < len(self.src) and (self.src[end] in _MODIFIER_FLAGS or self.src[end] == "-"):
            end += 1
        flags = self.src[self.pos + 1 : end]
        on, _, off = flags.partition("-")
        closing = self.src[end : end + 1]
        if closing == ")":
            raise self.fail(
                f"(?{flags}), a flag for the rest of the pattern, is not ECMA-262 syntax: write (?{flags}:...)"
            )
        if closing != ":" or not flags or flags.count("-") > 1 or len(set(on + off)) != len(on + off):
            raise self.fail("the group (" + self.src[self.pos : end + 1])
        self.pos = end + 1
        self.dotall.append(True if "s" in on else False if "s" in off else dotall)
        return f"(?{flags}:"

    def char_class(self) -> str:
        self.pos += 1
        negated = self.peek() == "^"
        if negated:
            self.pos += 1
        items: list[str] = []
        while True:
            if self.pos >= len(self.src):
                raise UnsupportedRegex("unterminated character class '[' in the pattern")
            if self.peek() == "]":
                self.pos += 1
                break
            low = self.class_atom()
            if self.peek() == "-" and self.peek(2) != "-]" and self.pos + 1 < len(self.src):
                self.pos += 1
                high = self.class_atom()
                if isinstance(low, str) or isinstance(high, str):
                    items.extend([_class_text(low), _hex(ord("-")), _class_text(high)])  # Annex B: [\d-z]
                    continue
                if low > high:
                    raise self.fail(f"the class range {_hex(low)}-{_hex(high)} is out of order")
                items.append(f"{_hex(low)}-{_hex(high)}")
            else:
                items.append(_class_text(low))
        if not items:  # [] matches nothing, [^] anything
            if negated:
                return "(?s:.)"
            raise self.fail("an empty class [] matches nothing; it")
        return "[" + ("^" if negated else "") + "".join(items) + "]"

    def class_atom(self) -> int | str:
        """One class member: a code point, or (for \\d and the like) the class text to embed."""
        ch = self.src[self.pos]
        if ch != "\\":
            self.pos += 1
            return ord(ch)
        if self.peek(2) == "\\b":
            self.pos += 2
            return 0x08  # backspace, inside a class
        if self.peek(2) == "\\-":
            self.pos += 2
            return ord("-")
        text = self.escape(in_class=True)
        return text

    def escape(self, in_class: bool) -> str | int:
        """The escape at ``pos``: Rust text for a class escape or property, a code point's text
        (outside a class) or a code point (inside one, as an int)."""
        self.pos += 1
        if self.pos >= len(self.src):
            raise UnsupportedRegex("the pattern ends with a lone backslash")
        ch = self.src[self.pos]
        self.pos += 1
        if ch.lower() in _CLASS_ESCAPES:
            ranges = _ranges(_CLASS_ESCAPES[ch.lower()])
            return f"[^{ranges}]" if ch.isupper() else (ranges if in_class else f"[{ranges}]")
        if ch in "pP":
            if self.peek() != "{" or self.src.find("}", self.pos) < 0:
                raise self.fail(f"\\{ch} without {{...}}")
            end = self.src.find("}", self.pos)
            prop = self.src[self.pos : end + 1]
            self.pos = end + 1
            return f"\\{ch}{prop}"
        cp = self.code_point(ch)
        return cp if in_class else _hex(cp)

    def code_point(self, ch: str) -> int:
        if ch in _CONTROL_ESCAPES:
            return _CONTROL_ESCAPES[ch]
        if ch in _SYNTAX or ch == "-":
            return ord(ch)
        if ch == "0" and not self.peek().isdigit():
            return 0
        if ch == "c" and self.peek().isascii() and self.peek().isalpha():
            self.pos += 1
            return ord(self.src[self.pos - 1]) % 32
        if ch == "x":
            digits = self.peek(2)
            if len(digits) == 2 and all(c in "0123456789abcdefABCDEF" for c in digits):
                self.pos += 2
                return int(digits, 16)
            raise self.fail("\\x without two hex digits")
        if ch == "u":
            return self.unicode_escape()
        if ch.isdigit():
            raise self.fail(f"the backreference \\{ch}")
        if ch == "k":
            raise self.fail("the named backreference \\k")
        if ch in "bB":
            raise self.fail(f"the word boundary \\{ch}")
        if ch.isascii() and ch.isalnum():
            raise self.fail(f"\\{ch} is not an escape ECMA-262 defines")
        return ord(ch)  # an identity escape of a non-syntax character

    def unicode_escape(self) -> int:
        if self.peek() == "{":
            end = self.src.find("}", self.pos)
            digits = self.src[self.pos + 1 : end] if end > 0 else ""
            if not digits or not all(c in "0123456789abcdefABCDEF" for c in digits) or int(digits, 16) > 0x10FFFF:
                raise self.fail("a malformed \\u{...} escape")
            self.pos = end + 1
            cp = int(digits, 16)
        else:
            cp = self._hex4()
            if 0xD800 <= cp <= 0xDBFF and self.peek(2) == "\\u":
                save = self.pos
                self.pos += 2
                low = self._hex4()
                if 0xDC00 <= low <= 0xDFFF:
                    return 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00)
                self.pos = save
        if 0xD800 <= cp <= 0xDFFF:
            raise self.fail(f"the lone surrogate \\u{cp:04X}")
        return cp

    def _hex4(self) -> int:
        digits = self.peek(4)
        if len(digits) != 4 or not all(c in "0123456789abcdefABCDEF" for c in digits):
            raise self.fail("\\u without four hex digits")
        self.pos += 4
        return int(digits, 16)
