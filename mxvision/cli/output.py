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
            "written \\\\, \\t, \\n, \\r and a byte that is not UTF-8 as \\xNN")
_TSV_SPECIAL = re.compile("[\\\\\t\n\r\udc80-\udcff]")
_TSV_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def tsv_field(text):
    """One field of mxvision's tab-separated output: backslash, tab, newline and carriage return
    escaped as ``\\\\``, ``\\t``, ``\\n``, ``\\r``, and a byte of a file name that is not UTF-8
    (Python keeps it as a lone surrogate) as ``\\xNN``, so every record is one line of N fields
    whatever the file names are."""
    def escape(m):
        char = m.group()
        if char in _TSV_ESCAPES:
            return _TSV_ESCAPES[char]
        return f"\\x{ord(char) - 0xDC00:02x}"
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
