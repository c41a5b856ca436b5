"""Untrusted text made safe to print on an operator's terminal.

The ``spoolops`` commands print, for a person (often root), fields that
others wrote: request ids and file names, op names, submitters, targets and
error messages come from web users; hosts, pids, counters, hook calls and
replies from the worker account; findings and janitor actions name them.
``printable`` turns any such value into text that cannot drive the terminal:
no escape or control sequence (ESC, BEL, CSI, OSC, a carriage return that
overwrites the line, a newline that forges one), no bidi override or isolate
that reorders what follows, no invisible format character that hides or
joins text.  Each is shown as a visible escape (``\\x1b``, ``\\u202e``)
instead.  Ordinary text, non-ASCII letters included, is left alone.

Trusts nothing it is given: the value may be any object (it is ``str()``-ed).
The fixed wording of the commands is not passed through it, so this module is
where a field is marked as data; ``--json`` output needs none of it
(``json.dumps`` escapes every control and non-ASCII character itself).
"""

from __future__ import annotations

import unicodedata

# Cc: C0 and C1 controls and DEL; Cf: format characters (bidi embeddings,
# overrides and isolates U+202A-U+202E and U+2066-U+2069, zero-width
# joiners and spaces, soft hyphen, BOM, tag characters); Zl, Zp: the line and
# paragraph separators (a line break to some terminals and viewers); Cs: lone
# surrogates (from JSON such as "\ud800"), which cannot even be encoded for
# the terminal: printed raw they crash the command that lists them.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
_SHORT = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(char: str) -> str:
    if char in _SHORT:
        return _SHORT[char]
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _unsafe(char: str) -> bool:
    code = ord(char)
    if code < 0x20 or 0x7F <= code <= 0x9F:     # C0, DEL, C1 (also Cc: said outright)
        return True
    return code > 0x9F and unicodedata.category(char) in _UNSAFE_CATEGORIES


def printable(value: object) -> str:
    """``value`` as text safe to print on a terminal: every control, bidi and
    invisible format character becomes a visible escape; the rest is kept.

    A backslash is doubled.  Left as it is, the escapes would be ambiguous:
    a submitter could name an op ``\\x1b[2J`` with a real backslash and it
    would print exactly like one carrying a real ESC, and two distinct ids
    (one with a real control, one with its escaped spelling) would print
    alike -- an operator copying the shown id to ``spoolops show`` or
    ``cancel`` would act on the other one.  Doubled, the text printed maps
    back to exactly one value (as Python's ``repr`` does).  Backslashes are
    rare in what spoolops shows (Unix paths, ids, op names), so the cost in
    readability is small."""
    text = value if isinstance(value, str) else str(value)
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text          # the common case, at no cost
    return "".join("\\\\" if char == "\\" else _escape(char) if _unsafe(char) else char
                   for char in text)


def printable_lines(text: object) -> str:
    """``printable`` for a message that may be several lines on purpose (an
    error that quotes a configuration file): each line is escaped, and the
    newlines between them kept."""
    return "\n".join(printable(line) for line in str(text).split("\n"))
