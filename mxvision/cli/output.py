"""How commands print results a program reads: a TSV whose records are one line whatever the file
names hold, and JSON that is valid whatever the numbers are.

File names may hold tabs, newlines, backslashes and bytes that are not UTF-8; a plain
``print(path)`` would split one record over several lines (or, for a byte that is not UTF-8,
fail with UnicodeEncodeError). Scores may be NaN (weights with impossible values), which
``json.dumps`` would write as ``NaN``, not JSON.
"""
import json
import math
import re

#: For the ``--help`` of commands that print :func:`print_tsv` lines.
TSV_HELP = ("tab-separated; in paths and messages a backslash, tab, newline and carriage return are "
            "written \\\\, \\t, \\n, \\r, other control characters and a byte that is not UTF-8 "
            "as \\xNN (\\uNNNN for a line separator)")
#: Characters a terminal or a line-oriented reader acts on: C0 controls (ESC, BEL, line breaks...),
#: DEL, C1 controls and the Unicode line/paragraph separators. A file name holding ESC could
#: otherwise retitle or clear the user's terminal through an error line, and U+2028 split a record
#: for ``str.splitlines``. Lone surrogates are bytes of a file name that are not UTF-8.
_CONTROLS = "\x00-\x1f\x7f-\x9f\u2028\u2029"
_UNSAFE = re.compile(f"[{_CONTROLS}\udc80-\udcff]")
_TSV_SPECIAL = re.compile(f"[\\\\{_CONTROLS}\udc80-\udcff]")
_TSV_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escaped(char):
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8, as Python keeps it in a file name
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe_text(text):
    """``text`` with every control character, line separator and non-UTF-8 byte written as a
    visible escape (``\\x1b``, ``\\u2028``, ``\\xNN``): what any mxvision line shown on a terminal
    may hold, e.g. an error naming a file. Printable text, backslashes included, is unchanged."""
    return _UNSAFE.sub(lambda m: _escaped(m.group()), str(text))


def tsv_field(text):
    """One field of mxvision's tab-separated output: backslash, tab, newline and carriage return
    escaped as ``\\\\``, ``\\t``, ``\\n``, ``\\r``, and a byte of a file name that is not UTF-8
    (Python keeps it as a lone surrogate) as ``\\xNN``, so every record is one line of N fields
    whatever the file names are."""
    def escape(m):
        char = m.group()
        return _TSV_ESCAPES.get(char) or _escaped(char)
    return _TSV_SPECIAL.sub(escape, str(text))


def print_tsv(*fields):
    """Print one line of :func:`tsv_field` fields joined by tabs."""
    print("\t".join(tsv_field(f) for f in fields))


def print_json(obj):
    """Print ``obj`` as strict JSON: NaN and infinities (which JSON has not) become null, and
    every character outside ASCII is escaped, so any file name survives."""
    print(json.dumps(_finite(obj), indent=2, allow_nan=False))


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
