"""Read PyTorch ``.pt`` weight files into NumPy arrays without PyTorch and without running their code.

A ``.pt`` file is a *pickle*: unpickling it with :func:`pickle.load` (or ``torch.load(...,
weights_only=False)``) can call any importable function with any arguments, so a weights file from
the internet is, to plain pickle, a program. This module reads the pickle format with the
whitelisting unpickler of :mod:`mxvision.io.torchfile.unpickler`, so the *only* callables a file
can reach build NumPy arrays and inert records.

Both of PyTorch's on-disk layouts are read:

* the **zip** format (PyTorch >= 1.6): ``<archive>/data.pkl`` holds the pickle and each storage
  is the raw little-endian bytes of ``<archive>/data/<key>`` (``<archive>/byteorder`` may say
  ``big``);
* the **legacy** format (PyTorch < 1.6, still readable by ``torch.load``): a magic-number
  pickle, a protocol-version pickle, a sys-info pickle, the main pickle, a pickle listing the
  storage keys, then per storage an int64 element count and the raw bytes. The main pickle is
  read twice: once to learn (and check) the storages its tensors use, then, with their bytes
  read, to build the tensors.

The very old tar format (PyTorch < 0.4) and TorchScript archives are recognised and refused with
a clear message.

A weights file is also a security boundary, so everything is bounded before memory is reserved:
the file must be a regular file no larger than the weights can be (``max_bytes`` of tensor data,
from :func:`byte_limit_for` of what the network needs, plus room for the pickles); the pickle's
size, object count and nesting (:mod:`~.scan`); each zip member's declared size, encryption and
compression method, and its CRC; every storage's size and every tensor's size/stride/offset
against its storage and the budget; and the walk from a pickled model to its state dict refuses
cycles and stops at a number of modules no network has. Every failure is one line naming the file.

:func:`mxvision.io.torchfile.writer.save_torch_file` writes the same formats (no PyTorch
either); the optional parity suite checks that ``torch.load`` reads them and that files written
by ``torch.save`` read back here.
"""
import io
import os
import struct
from collections import OrderedDict

import numpy as np

from mxvision.errors import WeightsError
from mxvision.io.torchfile.files import open_weights_file, open_zip, read_exactly, read_zip_member
from mxvision.io.torchfile.unpickler import (
    LEGACY_MAGIC, LEGACY_PROTOCOL, ModuleRecord, RestrictedUnpickler, Storage, describe, size_text)

__all__ = ["load_torch_file", "read_torch_pickle", "read_torch_bytes", "state_dict_from", "byte_limit_for",
           "open_weights_file", "RestrictedUnpickler", "ModuleRecord", "LEGACY_MAGIC", "LEGACY_PROTOCOL",
           "DEFAULT_MAX_BYTES", "PICKLE_ALLOWANCE"]

DEFAULT_MAX_BYTES = 1 << 30        # tensor data a file may hold when the caller knows no better
PICKLE_ALLOWANCE = 64 << 20        # what a file may hold besides tensor data (pickles, zip directory)
MAX_PICKLE_BYTES = 64 << 20        # the zip format's data.pkl
MAX_ZIP_DIRECTORY = 8 << 20        # ~100,000 entries; PyTorch writes one per tensor plus four
MAX_MODULES = 100_000              # module visits while walking a pickled model (DenseNet-121: 430)
MAX_MODULE_DEPTH = 100             # modules inside modules (torchvision's deepest: under 10)
MAX_NAME = 256                     # characters in one parameter or module name


def byte_limit_for(expected_bytes):
    """The ``max_bytes`` to read weights for a network whose parameters take ``expected_bytes`` as
    float32: room for float64 storages and a checkpoint's optimizer state (4x) plus 64 MB of small
    extras, so real files always fit and a file claiming gigabytes for a small model does not."""
    return 4 * int(expected_bytes) + (64 << 20)


# --------------------------------------------------------------------------- file formats
def _no_storage(source):
    def refuse(key, dtype, numel):
        raise WeightsError(source, "storage reference in a header pickle")
    return refuse


def _same_storage(source, known, dtype, numel):
    if known.dtype.dtype != dtype.dtype or known.numel != numel:
        raise WeightsError(source, "storage %s is declared twice, as %r of %d and %r of %d elements"
                           % (describe(known.key), known.dtype, known.numel, dtype, numel))
    return known


def _read_zip(f, size, source, allow_modules, limit):
    with open_zip(f, size, source, MAX_ZIP_DIRECTORY) as zf:
        members = OrderedDict((info.filename, info) for info in zf.infolist())
        pkl = [n for n in members if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pkl:
            if any(n.endswith("constants.pkl") or "/code/" in n for n in members):
                raise WeightsError(source, "a TorchScript archive, not a torch.save() weights file; "
                                   "save model.state_dict() with torch.save instead")
            raise WeightsError(source, "zip file without data.pkl: not a PyTorch weights file")
        prefix = pkl[0][:-len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in members:
            raw = read_zip_member(zf, members[prefix + "byteorder"], source, 16)
            byteorder = bytes(raw).decode("ascii", "replace").strip() or "little"
            if byteorder not in ("little", "big"):
                raise WeightsError(source, "unknown byte order %s" % describe(byteorder))
        payload = read_zip_member(zf, members[pkl[0]], source, MAX_PICKLE_BYTES)
        storages = {}
        budget = [limit]  # storage bytes still allowed

        def storage(key, dtype, numel):
            if key in storages:
                return _same_storage(source, storages[key], dtype, numel)
            entry = prefix + "data/" + key
            if entry not in members:
                raise WeightsError(source, "storage %s is missing from the zip" % entry)
            s = Storage(key, dtype, numel)
            if s.nbytes > budget[0]:
                raise WeightsError(source, "storage %s declares %s; with the others that is more than "
                                   "the %s these weights can take (not these weights, or hostile)"
                                   % (entry, size_text(s.nbytes), size_text(limit)))
            info = members[entry]
            if info.file_size < s.nbytes:
                raise WeightsError(source, "storage %s holds %d bytes, the pickle promises %d "
                                   "(truncated or corrupt file)" % (entry, info.file_size, s.nbytes))
            raw = read_zip_member(zf, info, source, budget[0])
            budget[0] -= len(raw)
            s.set_bytes(raw, source, byteorder)
            storages[key] = s
            return s

        return RestrictedUnpickler(io.BytesIO(payload), source, storage, allow_modules, limit).load()


def _read_legacy(raw, source, allow_modules, limit):
    f = io.BytesIO(raw)

    def header():
        return RestrictedUnpickler(f, source, _no_storage(source), False, 0).load()

    magic = header()
    if not isinstance(magic, int) or magic != LEGACY_MAGIC:
        raise WeightsError(source, "not a PyTorch weights file (bad magic number)")
    protocol = header()
    if not isinstance(protocol, int) or protocol != LEGACY_PROTOCOL:
        raise WeightsError(source, "unsupported legacy protocol version %s" % describe(protocol))
    sys_info = header()
    little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
    order = "little" if little is not False else "big"
    declared = {}
    budget = [limit]

    def storage(key, dtype, numel):
        if key in declared:
            return _same_storage(source, declared[key], dtype, numel)
        s = Storage(key, dtype, numel)
        if s.nbytes > budget[0]:
            raise WeightsError(source, "its storages declare more than the %s these weights can take "
                               "(not these weights, or hostile)" % size_text(limit))
        budget[0] -= s.nbytes
        declared[key] = s
        return s

    first = RestrictedUnpickler(f, source, storage, allow_modules, limit)
    first.load()  # checks every tensor against its storage's declared size; builds placeholders
    keys = header()
    if not isinstance(keys, list):
        raise WeightsError(source, "corrupt storage key list (%s)" % describe(keys))
    view, pos = memoryview(raw), f.tell()
    for key in keys:
        key = str(key) if isinstance(key, int) and not isinstance(key, bool) else key
        if not isinstance(key, str) or key not in declared:
            raise WeightsError(source, "the file holds data for storage %s, which no tensor uses"
                               % describe(key))
        s = declared[key]
        if s.data is not None:
            raise WeightsError(source, "storage %s is listed twice" % describe(key))
        if pos + 8 > len(raw):
            raise WeightsError(source, "the file ends before storage %s (truncated download?)" % describe(key))
        count = struct.unpack_from("<q" if order == "little" else ">q", raw, pos)[0]
        if count != s.numel:
            raise WeightsError(source, "storage %s holds %d elements, the pickle promises %d"
                               % (describe(key), count, s.numel))
        start, pos = pos + 8, pos + 8 + s.nbytes
        if pos > len(raw):
            raise WeightsError(source, "the file ends inside storage %s (truncated download?)" % describe(key))
        s.set_bytes(view[start:pos], source, order)
    unread = [k for k, s in declared.items() if s.data is None]
    if unread:
        raise WeightsError(source, "storage %s has no data in the file (truncated or corrupt)" % describe(unread[0]))
    return RestrictedUnpickler(io.BytesIO(first.payload), source, storage, allow_modules, limit).load()


def read_torch_pickle(path, allow_modules=True, max_bytes=None):
    """The object a ``.pt`` file holds, with tensors as NumPy arrays and modules as records.

    ``max_bytes``: the most tensor data the file may hold (default :data:`DEFAULT_MAX_BYTES`;
    pass :func:`byte_limit_for` of what the network needs).
    """
    source = os.fspath(path)
    limit = DEFAULT_MAX_BYTES if max_bytes is None else int(max_bytes)
    with open_weights_file(source, limit + PICKLE_ALLOWANCE) as f:
        try:
            return _read_format(f, os.fstat(f.fileno()).st_size, source, allow_modules, limit)
        except OSError as err:  # a disk error mid-read
            raise WeightsError(source, "cannot read the weights file (%s)" % (err.strerror or err)) from None


def read_torch_bytes(raw, source, allow_modules=True, max_bytes=None):
    """The object the bytes of a ``.pt`` file hold, read as :func:`read_torch_pickle` reads a
    file: for a ``torch.save``d file that is a member of an archive, read out of it in bounded
    form (:func:`~mxvision.io.torchfile.files.read_zip_member`). ``source`` names it in messages."""
    limit = DEFAULT_MAX_BYTES if max_bytes is None else int(max_bytes)
    if len(raw) > limit + PICKLE_ALLOWANCE:
        raise WeightsError(source, "it is %s, more than the %s expected of these weights (the wrong "
                           "file, or a hostile one)" % (size_text(len(raw)), size_text(limit + PICKLE_ALLOWANCE)))
    return _read_format(io.BytesIO(raw), len(raw), source, allow_modules, limit)


def _read_format(f, size, source, allow_modules, limit):
    """The object in binary file ``f`` of ``size`` bytes, told apart by its first bytes."""
    if not size:
        raise WeightsError(source, "file is empty (0 bytes)")
    head = f.read(512)
    f.seek(0)
    if head[:4] == b"PK\x03\x04":
        return _read_zip(f, size, source, allow_modules, limit)
    if head[:1] == b"\x80":
        return _read_legacy(read_exactly(f, size, source), source, allow_modules, limit)
    if len(head) > 262 and head[257:262] == b"ustar":
        raise WeightsError(source, "the tar format of PyTorch < 0.4 is not supported; re-save the "
                           "weights with a newer PyTorch")
    if head[:64].lstrip().lower().startswith((b"<!doctype html", b"<html")):
        raise WeightsError(source, "an HTML page, not a weights file (wrong URL or a login page)")
    raise WeightsError(source, "not a PyTorch weights file (neither the zip nor the legacy format)")


# --------------------------------------------------------------------------- state dicts
def _name(source, name, where):
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
        raise WeightsError(source, "%s has a name that is %s, not a short string" % (where, describe(name)))
    return name


def _group(source, state, key, where):
    value = state.get(key)
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise WeightsError(source, "%s%s is %s, not a dict" % (where, key, describe(value)))
    return value.items()


def _module_state(root, source):
    """``Module.state_dict()`` of a pickled model, walked without recursion: a module that
    contains itself is refused, and so is a graph whose shared sub-modules would have to be
    visited more than :data:`MAX_MODULES` times (a few dozen levels of sharing are 2**N paths)."""
    out = OrderedDict()
    visits = 0
    todo = [(root, "", ())]
    while todo:
        rec, prefix, ancestors = todo.pop()
        where = prefix or "the model's "
        visits += 1
        if visits > MAX_MODULES:
            raise WeightsError(source, "its modules would be visited more than %d times (shared or "
                               "hostile sub-modules)" % MAX_MODULES)
        if id(rec) in ancestors:
            raise WeightsError(source, "module %s contains itself (a reference cycle)" % (prefix[:-1] or "model"))
        if len(ancestors) >= MAX_MODULE_DEPTH:
            raise WeightsError(source, "modules nested more than %d deep" % MAX_MODULE_DEPTH)
        state = rec.state
        skip = state.get("_non_persistent_buffers_set") or ()
        if not isinstance(skip, (set, frozenset, list, tuple)):
            raise WeightsError(source, "%s_non_persistent_buffers_set is %s, not a set of names"
                               % (where, describe(skip)))
        for group in ("_parameters", "_buffers"):
            for name, value in _group(source, state, group, where):
                name = _name(source, name, where + group)
                if value is None or (group == "_buffers" and name in skip):
                    continue
                if not isinstance(value, np.ndarray):
                    raise WeightsError(source, "%s%s is %s, not a tensor" % (prefix, name, describe(value)))
                out[prefix + name] = value
        children = []
        for name, child in _group(source, state, "_modules", where):
            name = _name(source, name, where + "_modules")
            if child is None:
                continue
            if not isinstance(child, ModuleRecord):
                raise WeightsError(source, "%s%s is %s, not a module" % (prefix, name, describe(child)))
            children.append((child, prefix + name + ".", ancestors + (id(rec),)))
        todo.extend(reversed(children))  # depth first, in the file's order, as state_dict() does
    return out


def _named_tensors(obj, source):
    out = OrderedDict()
    for key, value in obj.items():
        out[_name(source, key, "a tensor")] = value
    return out


def state_dict_from(obj, source="weights"):
    """A flat ``{name: ndarray}`` from what a ``.pt`` held: a state dict, a pickled model, or a
    checkpoint dict with a ``state_dict``/``model`` entry. Like ``Module.state_dict()``,
    non-persistent buffers are left out."""
    for _ in range(8):
        if isinstance(obj, ModuleRecord):
            return _module_state(obj, source)
        if not isinstance(obj, dict):
            raise WeightsError(source, "holds %s, not a state dict or a model" % describe(obj))
        if obj and all(isinstance(v, np.ndarray) for v in obj.values()):
            return _named_tensors(obj, source)
        inner = next((obj[k] for k in ("state_dict", "model_state_dict", "model")
                      if isinstance(obj.get(k), (dict, ModuleRecord))), None)
        if inner is None:
            bad = [describe(k) for k, v in obj.items() if not isinstance(v, np.ndarray)][:3]
            raise WeightsError(source, "a dict whose entries are not all tensors (e.g. %s)"
                               % (", ".join(bad) or "it is empty"))
        obj = inner
    raise WeightsError(source, "checkpoint dicts nested too deeply")


def load_torch_file(path, allow_modules=True, max_bytes=None):
    """``{name: float/int ndarray}``: the state dict in a PyTorch ``.pt`` file, read safely.

    Raises :class:`~mxvision.errors.WeightsError` naming the file for anything that is not a
    readable weights file, including any attempt to reach a non-whitelisted callable, and for
    files holding more than ``max_bytes`` of tensor data (see :func:`read_torch_pickle`).
    """
    return state_dict_from(read_torch_pickle(path, allow_modules, max_bytes), os.fspath(path))
