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
  storage keys, then per storage an int64 element count and the raw bytes.

The very old tar format (PyTorch < 0.4) and TorchScript archives are recognised and refused with
a clear message.

:func:`mxvision.io.torchfile.writer.save_torch_file` writes the same formats (no PyTorch
either); the optional parity suite checks that ``torch.load`` reads them and that files written
by ``torch.save`` read back here.
"""
import io
import os
import pickle
import struct
import zipfile
from collections import OrderedDict

import numpy as np

from mxvision.errors import WeightsError
from mxvision.io.torchfile.unpickler import (
    LEGACY_MAGIC, LEGACY_PROTOCOL, ModuleRecord, RestrictedUnpickler, Storage, resolve_tensors)

__all__ = ["load_torch_file", "read_torch_pickle", "state_dict_from", "RestrictedUnpickler", "ModuleRecord",
           "LEGACY_MAGIC", "LEGACY_PROTOCOL"]



# --------------------------------------------------------------------------- file formats
def _open_bytes(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise WeightsError(path, "no such weights file") from None
    except OSError as err:
        raise WeightsError(path, "cannot read the weights file (%s)" % (err.strerror or err)) from None


def _unpickle(data, source, storages, allow_modules):
    try:
        return RestrictedUnpickler(data, source, storages, allow_modules).load()
    except WeightsError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, struct.error, UnicodeDecodeError) as err:
        raise WeightsError(source, "corrupt or unsupported pickle data (%s: %s)"
                           % (type(err).__name__, err)) from None


def _read_zip(raw, source, allow_modules):
    try:
        zf = zipfile.ZipFile(io.BytesIO(raw))
    except zipfile.BadZipFile as err:
        raise WeightsError(source, "corrupt zip container (%s)" % err) from None
    with zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pkl:
            if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
                raise WeightsError(source, "a TorchScript archive, not a torch.save() weights file; "
                                   "save model.state_dict() with torch.save instead")
            raise WeightsError(source, "zip file without data.pkl: not a PyTorch weights file")
        prefix = pkl[0][:-len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = zf.read(prefix + "byteorder").decode("ascii", "replace").strip() or "little"
        storages = {}

        def storage(key, dtype, numel):
            if key not in storages:
                entry = prefix + "data/" + key
                if entry not in names:
                    raise WeightsError(source, "storage %s is missing from the zip" % entry)
                info = zf.getinfo(entry)
                if info.file_size < numel * dtype.itemsize:
                    raise WeightsError(source, "storage %s holds %d bytes, the pickle promises %d "
                                       "(truncated or corrupt file)"
                                       % (entry, info.file_size, numel * dtype.itemsize))
                s = Storage(key, dtype, numel)
                try:
                    s.set_bytes(zf.read(entry), source, byteorder)
                except (zipfile.BadZipFile, OSError) as err:
                    raise WeightsError(source, "cannot read %s (%s)" % (entry, err)) from None
                storages[key] = s
            return storages[key]

        try:
            data = zf.read(pkl[0])
        except (zipfile.BadZipFile, OSError) as err:
            raise WeightsError(source, "cannot read %s (%s)" % (pkl[0], err)) from None
        return resolve_tensors(_unpickle(io.BytesIO(data), source, storage, allow_modules))


def _read_legacy(raw, source, allow_modules):
    f = io.BytesIO(raw)

    def no_storage(key, dtype, numel):
        raise WeightsError(source, "storage reference in a header pickle")

    magic = _unpickle(f, source, no_storage, False)
    if magic != LEGACY_MAGIC:
        raise WeightsError(source, "not a PyTorch weights file (bad magic number)")
    protocol = _unpickle(f, source, no_storage, False)
    if protocol != LEGACY_PROTOCOL:
        raise WeightsError(source, "unsupported legacy protocol version %r" % (protocol,))
    sys_info = _unpickle(f, source, no_storage, False)
    little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
    storages = {}

    def storage(key, dtype, numel):
        if key not in storages:
            storages[key] = Storage(key, dtype, numel)
        return storages[key]

    result = _unpickle(f, source, storage, allow_modules)
    keys = _unpickle(f, source, no_storage, False)
    if not isinstance(keys, list):
        raise WeightsError(source, "corrupt storage key list")
    for key in keys:
        key = str(key)
        if key not in storages:
            raise WeightsError(source, "storage %r has data but no tensor uses it" % key)
        s = storages[key]
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(source, "file ends before storage %r (truncated download?)" % key)
        count = struct.unpack("<q" if little else ">q", head)[0]
        if count != s.numel:
            raise WeightsError(source, "storage %r holds %d elements, the pickle promises %d"
                               % (key, count, s.numel))
        s.set_bytes(f.read(count * s.dtype.itemsize), source, "little" if little else "big")
    return resolve_tensors(result)


def read_torch_pickle(path, allow_modules=True):
    """The object a ``.pt`` file holds, with tensors as NumPy arrays and modules as records."""
    source = os.fspath(path)
    raw = _open_bytes(source)
    if not raw:
        raise WeightsError(source, "file is empty (0 bytes)")
    if raw[:4] == b"PK\x03\x04":
        return _read_zip(raw, source, allow_modules)
    if raw[:2] == b"\x80\x02" or raw[:1] == b"\x80":
        return _read_legacy(raw, source, allow_modules)
    if len(raw) > 262 and raw[257:262] == b"ustar":
        raise WeightsError(source, "the tar format of PyTorch < 0.4 is not supported; re-save the "
                           "weights with a newer PyTorch")
    head = raw[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        raise WeightsError(source, "an HTML page, not a weights file (wrong URL or a login page)")
    raise WeightsError(source, "not a PyTorch weights file (neither the zip nor the legacy format)")


def state_dict_from(obj, source="weights"):
    """A flat ``{name: ndarray}`` from what a ``.pt`` held: a state dict, a pickled model, or a
    checkpoint dict with a ``state_dict``/``model`` entry. Like ``Module.state_dict()``,
    non-persistent buffers are left out."""
    if isinstance(obj, ModuleRecord):
        out = OrderedDict()
        _walk_module(obj, "", out, source)
        return out
    if isinstance(obj, dict):
        if obj and all(isinstance(v, np.ndarray) for v in obj.values()):
            return OrderedDict((str(k), v) for k, v in obj.items())
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], (dict, ModuleRecord)):
                return state_dict_from(obj[key], source)
        bad = [k for k, v in obj.items() if not isinstance(v, np.ndarray)][:3]
        raise WeightsError(source, "a dict whose entries are not all tensors (e.g. %s)" % bad)
    raise WeightsError(source, "holds a %s, not a state dict or a model" % type(obj).__name__)


def _walk_module(rec, prefix, out, source):
    state = rec.state
    skip = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is None or (group == "_buffers" and name in skip):
                continue
            if not isinstance(value, np.ndarray):
                raise WeightsError(source, "%s%s is a %s, not a tensor" % (prefix, name, type(value).__name__))
            out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, ModuleRecord):
            raise WeightsError(source, "%s%s is not a module" % (prefix, name))
        _walk_module(child, prefix + name + ".", out, source)


def load_torch_file(path, allow_modules=True):
    """``{name: float/int ndarray}``: the state dict in a PyTorch ``.pt`` file, read safely.

    Raises :class:`~mxvision.errors.WeightsError` naming the file for anything that is not a
    readable weights file, including any attempt to reach a non-whitelisted callable.
    """
    return state_dict_from(read_torch_pickle(path, allow_modules), os.fspath(path))
