"""Check a pickle's opcodes before anything is built from them: size, object count, nesting, keys.

The whitelist of :mod:`mxvision.io.torchfile.unpickler` decides *what* a weights file may build;
this module bounds *how much*, and how costly. ``pickle.Unpickler`` trusts the lengths and
indices a file gives: an 8-byte ``BINBYTES8`` length of 2**50 is allocated before the bytes are
read, a ``LONG_BINPUT`` index of 2**32 grows the memo to that many slots, ten thousand nested
tuples make hashing them recurse in C until the process dies, and dict keys chosen to share one
hash (tuples and big integers can be made to: their hashes are not randomised like strings')
make building the dict quadratic -- minutes for a file of a few megabytes.

:func:`scan_pickle` walks the opcodes with :func:`pickletools.genops` -- which only reads, and
reads from an in-memory buffer, so a lying length ends the walk instead of reserving memory --
and runs a model of the unpickler's stack and memo that tracks, per object, how deep it nests,
whether its hash could be forged, and (for lists and tuples) what it holds. Objects fetched from
the memo are the same model objects, so filling a list after storing it is seen. Dict keys and
set members must be strings, bytes, small integers, floats, booleans or None (all PyTorch
writes); tuples, frozensets and big integers there are refused. Only a pickle that passes is
handed to the unpickler.

The limits are far above what PyTorch writes (torchxrayvision's pickled DenseNet-121: 37,000
opcodes, nesting depth under 30) and far below what hurts.
"""
import pickletools
import struct

from mxvision.errors import WeightsError, one_line

MAX_OPS = 1_000_000           # opcodes in one pickle
MAX_DEPTH = 400               # how deeply objects may nest (a few levels per module level)
MAX_ARGUMENT_BYTES = 1 << 20  # one string or bytes object inside a pickle (names are short)
MAX_INT_BITS = 128            # one integer (the legacy format's magic number has 77 bits)
_SMALL_INT = 1 << 60          # below this, an int's hash is the int: no two collide

_MARK = pickletools.markobject
_MUTATORS = frozenset(["APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"])
_PUTS = frozenset(["PUT", "BINPUT", "LONG_BINPUT"])
_GETS = frozenset(["GET", "BINGET", "LONG_BINGET"])
_CALLS = frozenset(["REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ", "INST"])
_SCALARS = frozenset(["None", "bool", "float", "bytes", "str", "bytes_or_str"])
_HASHED = ("builtins set", "builtins frozenset", "__builtin__ set", "__builtin__ frozenset")

KEY, FORGEABLE, OTHER = "key", "forgeable", "other"  # what an object's hash is like


class _Value:
    """The model of one object: nesting depth, hash kind, held items (lists, tuples), name
    (strings: their text; globals: ``module name``; results of calls: what was called)."""

    __slots__ = ("depth", "kind", "items", "name")

    def __init__(self, depth=0, kind=OTHER, items=None, name=None):
        self.depth, self.kind, self.items, self.name = depth, kind, items, name


_SCALAR = _Value(0, KEY)
_BIG_INT = _Value(0, FORGEABLE)


def _problem(source, text):
    return WeightsError(source, "corrupt or hostile pickle data (%s)" % text)


def _scalar(source, name, arg):
    if isinstance(arg, (bytes, bytearray, str)):
        if len(arg) > MAX_ARGUMENT_BYTES:
            raise _problem(source, "a %s of %d bytes; a weights pickle holds names, not data" % (name, len(arg)))
        return _Value(0, KEY, name=arg) if isinstance(arg, str) and len(arg) <= 200 else _SCALAR
    if isinstance(arg, int) and not isinstance(arg, bool):
        if arg.bit_length() > MAX_INT_BITS:
            raise _problem(source, "an integer of %d bits" % arg.bit_length())
        return _SCALAR if abs(arg) < _SMALL_INT else _BIG_INT
    return _SCALAR


def _check_keys(source, keys, what):
    if any(k.kind == FORGEABLE for k in keys):
        raise _problem(source, "%s is a tuple, frozenset or big integer; weights files key by name" % what)


def _check_call(source, func, args):
    """set/frozenset/OrderedDict(iterable) hash what the iterable yields: check it like keys."""
    name = func.name if func.kind == OTHER and isinstance(func.name, str) and "?" not in func.name else None
    if name in _HASHED or name == "collections OrderedDict" or name is None:
        for arg in (args.items or []) if args.kind == FORGEABLE else []:
            if arg.items is not None:  # a list or tuple of members (or of pairs)
                _check_keys(source, arg.items, "a set member or dict key")
                if name == "collections OrderedDict" and arg.items:
                    raise _problem(source, "an OrderedDict built from a list; PyTorch fills it item by item")
            elif arg.kind == FORGEABLE:
                raise _problem(source, "%s called with a big integer" % (name or "a function"))
    kind = FORGEABLE if name in ("builtins frozenset", "__builtin__ frozenset") else OTHER
    return kind, ("dict" if name == "collections OrderedDict" else name)


def _pop(source, stack, marks, before):
    """The model objects the opcode takes off the stack (``before`` from pickletools)."""
    if _MARK in before:
        below = before.index(_MARK)
        if not marks:
            raise _problem(source, "an opcode needs a MARK that is not there")
        start = marks.pop() - below
    else:
        start = len(stack) - len(before)
    if start < 0:
        raise _problem(source, "the pickle stack runs empty")
    taken = stack[start:]
    del stack[start:]
    return taken


def _mutate(source, name, taken):
    target, added = taken[0], taken[1:]
    if target is _SCALAR or target is _BIG_INT:
        raise _problem(source, "%s on a number or string" % name)
    if name in ("SETITEM", "SETITEMS"):
        _check_keys(source, added[0::2], "a dict key")
    elif name == "ADDITEMS":
        _check_keys(source, added, "a set member")
    elif name != "BUILD" and target.items is not None:
        target.items.extend(added)
    target.depth = max([target.depth] + [1 + v.depth for v in added])
    return target


def _result(source, name, produced, taken, arg):
    """The model object an ordinary opcode pushes, built from ``taken`` (and its argument)."""
    depth = 1 + max(v.depth for v in taken) if taken else 0
    if produced in _SCALARS or produced in ("int", "int_or_bool"):
        return _scalar(source, name, arg)
    if produced == "tuple":
        return _Value(depth, FORGEABLE, items=list(taken))
    if produced == "list":
        return _Value(depth, OTHER, items=list(taken), name="list")
    if produced in ("dict", "set", "frozenset"):
        members = taken[0::2] if produced == "dict" else taken
        _check_keys(source, members, "a set member" if produced != "dict" else "a dict key")
        return _Value(depth, FORGEABLE if produced == "frozenset" else OTHER, name=produced)
    if name in ("GLOBAL", "INST"):
        return _Value(depth, OTHER, name=arg)
    if name == "STACK_GLOBAL":
        parts = [v.name if isinstance(v.name, str) else "?" for v in taken]
        return _Value(depth, OTHER, name=" ".join(parts))
    if name in _CALLS:
        if name == "INST":
            func, args = _Value(name=arg), _Value(kind=FORGEABLE, items=taken)
        elif name == "OBJ":
            func, args = taken[0], _Value(kind=FORGEABLE, items=taken[1:])
        else:
            func, args = taken[0], taken[1]
        kind, what = _check_call(source, func, args)
        return _Value(depth, kind, name=what)
    return _Value(depth, OTHER)  # persistent ids, extension codes, buffers, bytearrays


def scan_pickle(file, source, max_ops=MAX_OPS, max_depth=MAX_DEPTH):
    """The bytes of the one pickle that starts at ``file``'s position (an in-memory binary file,
    e.g. ``io.BytesIO``), after checking them; ``file`` is left just past its STOP opcode.

    Raises :class:`~mxvision.errors.WeightsError` naming ``source`` when the pickle is truncated
    or malformed, has more than ``max_ops`` opcodes, an oversized string, bytes or integer, a
    memo index beyond its opcode count, objects nested deeper than ``max_depth``, or a dict key
    or set member whose hash could be forged.
    """
    start = file.tell()
    stack, marks, memo = [], [], {}
    count = 0
    try:
        for op, arg, _pos in pickletools.genops(file):
            count += 1
            if count > max_ops:
                raise _problem(source, "more than %d opcodes" % max_ops)
            name = op.name
            if name in _PUTS or name == "MEMOIZE":
                if not stack:
                    raise _problem(source, "%s with an empty stack" % name)
                index = arg if name in _PUTS else len(memo)
                if not 0 <= index <= max_ops:
                    raise _problem(source, "memo index %d" % index)
                memo[index] = stack[-1]
                continue
            if name in _GETS:
                if arg not in memo:
                    raise _problem(source, "memo index %d was never stored" % arg)
                stack.append(memo[arg])
                continue
            if name == "FRAME" and arg > MAX_ARGUMENT_BYTES * 64:
                raise _problem(source, "a frame of %d bytes" % arg)
            taken = _pop(source, stack, marks, op.stack_before)
            if name == "DUP":
                stack.extend(taken * 2)
                continue
            produced = [o.name for o in op.stack_after]
            if not produced:  # POP, POP_MARK, STOP, PROTO, FRAME
                continue
            if produced == ["mark"]:
                marks.append(len(stack))
                continue
            if name in _MUTATORS:
                value = _mutate(source, name, taken)
            else:
                value = _result(source, name, produced[0], taken, arg)
            if value.depth > max_depth:
                raise _problem(source, "objects nested more than %d levels deep" % max_depth)
            stack.append(value)
    except WeightsError:
        raise
    except (ValueError, EOFError, struct.error, OverflowError, TypeError, KeyError) as err:
        # pickletools says "pickle exhausted before seeing STOP", "expected N bytes ... only M remain"
        raise _problem(source, one_line(err, 160)) from None
    end = file.tell()
    file.seek(start)
    payload = file.read(end - start)
    file.seek(end)
    return payload
