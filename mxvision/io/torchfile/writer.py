"""Write PyTorch ``.pt`` files (zip or legacy layout, pickle protocol 2) without PyTorch.

The counterpart of :mod:`mxvision.io.torchfile.reader`: it emits the pickle opcodes of a state
dict (``torch._utils._rebuild_tensor_v2`` over ``torch.FloatStorage``-style storages) or of a
whole pickled model (module classes rebuilt with ``NEWOBJ`` + ``BUILD`` of their ``__dict__``,
the way ``torch.save(model)`` stores them), plus the container layout around it. mxvision uses it
to make weight files in PyTorch's real formats for tests and local mirrors; the optional parity
suite checks that ``torch.load`` reads what it writes.
"""
import os
import struct
import zipfile
from collections import OrderedDict

import numpy as np

from mxvision.io.torchfile.reader import LEGACY_MAGIC, LEGACY_PROTOCOL

__all__ = ["save_torch_file", "TorchModule", "PickleWriter", "GlobalRef", "Reduce", "PersistentId",
           "NewObj"]


class TorchModule:
    """Describes a module for :func:`save_torch_file` (test fixtures of whole pickled models).

    ``cls`` is the dotted class name (``torch.nn.modules.conv.Conv2d``); ``parameters`` and
    ``buffers`` map names to arrays; ``modules`` maps child names to ``TorchModule``; ``attrs``
    adds plain attributes (numbers, strings, tuples, None).
    """

    def __init__(self, cls, parameters=None, buffers=None, modules=None, attrs=None):
        self.cls = cls
        self.parameters = OrderedDict(parameters or {})
        self.buffers = OrderedDict(buffers or {})
        self.modules = OrderedDict(modules or {})
        self.attrs = dict(attrs or {})


_NP_TO_STORAGE = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
                  np.dtype(np.float16): "HalfStorage", np.dtype(np.int64): "LongStorage",
                  np.dtype(np.int32): "IntStorage", np.dtype(np.int16): "ShortStorage",
                  np.dtype(np.int8): "CharStorage", np.dtype(np.uint8): "ByteStorage",
                  np.dtype(np.bool_): "BoolStorage"}


# The pickle building blocks below are public so that tests can write the files no honest writer
# makes (a GLOBAL of ``os.system``, a tensor view past its storage) and check the reader refuses them.
class GlobalRef:
    """``module.name`` as the pickle ``GLOBAL`` opcode names it (a class or function to look up)."""

    def __init__(self, module, name):
        self.module, self.name = module, name


class Reduce:
    """``func(*args)`` as the ``REDUCE`` opcode: what unpickling will call (``func`` a GlobalRef)."""

    def __init__(self, func, args):
        self.func, self.args = func, args


class PersistentId:
    """A ``BINPERSID`` reference (``value`` a tuple): how PyTorch points a tensor at its storage."""

    def __init__(self, value):
        self.value = value


class NewObj:
    """``cls.__new__(cls)`` then ``BUILD`` with ``state``: how a pickled ``nn.Module`` is stored.

    ``cls_pers``, when given, replaces ``cls`` by a persistent id (the legacy format's way)."""

    def __init__(self, cls, state, cls_pers=None):
        self.cls, self.state, self.cls_pers = cls, state, cls_pers


class PickleWriter:
    """Emits pickle protocol 2 opcodes for the few object kinds a weights file needs.

    ``PickleWriter().dump(obj)`` is the bytes of one pickle of ``obj``: None, bools, ints,
    floats, strings, tuples, lists, dicts, OrderedDicts, sets and the building blocks above.
    """

    def __init__(self):
        self.out = bytearray(b"\x80\x02")

    def dump(self, obj):
        self.save(obj)
        self.out += b"."
        return bytes(self.out)

    def save(self, obj):  # noqa: C901 - one branch per opcode family
        o = self.out
        if obj is None:
            o += b"N"
        elif obj is True:
            o += b"\x88"
        elif obj is False:
            o += b"\x89"
        elif isinstance(obj, int):
            if 0 <= obj < 256:
                o += b"K" + bytes([obj])
            elif -2 ** 31 <= obj < 2 ** 31:
                o += b"J" + struct.pack("<i", obj)
            else:
                n = (obj.bit_length() + 8) // 8
                o += b"\x8a" + bytes([n]) + obj.to_bytes(n, "little", signed=True)
        elif isinstance(obj, float):
            o += b"G" + struct.pack(">d", obj)
        elif isinstance(obj, str):
            b = obj.encode("utf-8")
            o += b"X" + struct.pack("<I", len(b)) + b
        elif isinstance(obj, tuple):
            if not obj:
                o += b")"
            else:
                o += b"("
                for v in obj:
                    self.save(v)
                o += b"t"
        elif isinstance(obj, list):
            o += b"]"
            if obj:
                o += b"("
                for v in obj:
                    self.save(v)
                o += b"e"
        elif isinstance(obj, OrderedDict):
            self.save(Reduce(GlobalRef("collections", "OrderedDict"), ()))
            self._setitems(obj)
        elif isinstance(obj, dict):
            o += b"}"
            self._setitems(obj)
        elif isinstance(obj, set):
            self.save(Reduce(GlobalRef("builtins", "set"), (sorted(obj),)))
        elif isinstance(obj, GlobalRef):
            o += b"c" + obj.module.encode() + b"\n" + obj.name.encode() + b"\n"
        elif isinstance(obj, Reduce):
            self.save(obj.func)
            self.save(tuple(obj.args))
            o += b"R"
        elif isinstance(obj, PersistentId):
            self.save(obj.value)
            o += b"Q"
        elif isinstance(obj, NewObj):
            self.save(obj.cls_pers if obj.cls_pers is not None else obj.cls)
            o += b")\x81"
            self.save(obj.state)
            o += b"b"
        else:
            raise TypeError("cannot write %r into a weights pickle" % (type(obj),))

    def _setitems(self, d):
        if d:
            self.out += b"("
            for k, v in d.items():
                self.save(k)
                self.save(v)
            self.out += b"u"


def _tensor_node(arr, storages, legacy):
    arr = np.array(arr, order="C")  # (np.ascontiguousarray would turn a 0-d array into 1-d)
    if arr.dtype not in _NP_TO_STORAGE:
        raise TypeError("unsupported dtype %s" % arr.dtype)
    key = str(len(storages))
    storages.append((key, arr))
    stype = GlobalRef("torch", _NP_TO_STORAGE[arr.dtype])
    pid = ("storage", stype, key, "cpu", int(arr.size)) + ((None,) if legacy else ())
    stride, acc = [], 1
    for n in reversed(arr.shape):
        stride.insert(0, acc)
        acc *= n
    return Reduce(GlobalRef("torch._utils", "_rebuild_tensor_v2"),
                   (PersistentId(pid), 0, tuple(int(n) for n in arr.shape), tuple(stride), False,
                    Reduce(GlobalRef("collections", "OrderedDict"), ())))


def _module_node(mod, storages, legacy):
    module, _, name = mod.cls.rpartition(".")
    params = OrderedDict()
    for k, v in mod.parameters.items():
        params[k] = None if v is None else Reduce(GlobalRef("torch._utils", "_rebuild_parameter"),
                                                   (_tensor_node(v, storages, legacy), True,
                                                    Reduce(GlobalRef("collections", "OrderedDict"), ())))
    state = {"training": False, "_parameters": params,
             "_buffers": OrderedDict((k, _tensor_node(v, storages, legacy)) for k, v in mod.buffers.items()),
             "_backward_hooks": OrderedDict(), "_forward_hooks": OrderedDict(),
             "_forward_pre_hooks": OrderedDict(), "_state_dict_hooks": OrderedDict(),
             "_load_state_dict_pre_hooks": OrderedDict(),
             "_modules": OrderedDict((k, None if c is None else _module_node(c, storages, legacy))
                                     for k, c in mod.modules.items())}
    state.update(mod.attrs)
    cls = GlobalRef(module, name)
    # torch's legacy writer names each nn.Module class through a ('module', cls, file, source) id
    cls_pers = PersistentId(("module", cls, None, None)) if legacy else None
    return NewObj(cls, state, cls_pers)


def _build_tree(obj, storages, legacy):
    if isinstance(obj, TorchModule):
        return _module_node(obj, storages, legacy)
    if isinstance(obj, dict):
        items = [(k, _build_tree(v, storages, legacy)) for k, v in obj.items()]
        return OrderedDict(items) if isinstance(obj, OrderedDict) else dict(items)
    if isinstance(obj, (list, tuple)):  # a checkpoint's optimizer states: lists of dicts of tensors
        return type(obj)(_build_tree(v, storages, legacy) for v in obj)
    if isinstance(obj, np.ndarray):
        return _tensor_node(obj, storages, legacy)
    return obj


def save_torch_file(obj, path, fmt="zip", archive_name="archive"):
    """Write ``obj`` (a dict of ndarrays, or a :class:`TorchModule` tree) as ``torch.save`` would.

    ``fmt="zip"`` is PyTorch >= 1.6's default layout, ``fmt="legacy"`` the older one. The
    parity suite checks ``torch.load`` reads both. Data is written little-endian.
    """
    if fmt not in ("zip", "legacy"):
        raise ValueError("fmt must be 'zip' or 'legacy'")
    legacy = fmt == "legacy"
    storages = []
    payload = PickleWriter().dump(_build_tree(obj, storages, legacy))
    path = os.fspath(path)
    if legacy:
        with open(path, "wb") as f:
            f.write(PickleWriter().dump(LEGACY_MAGIC))
            f.write(PickleWriter().dump(LEGACY_PROTOCOL))
            f.write(PickleWriter().dump({"protocol_version": LEGACY_PROTOCOL, "little_endian": True,
                                          "type_sizes": {"short": 2, "int": 4, "long": 4}}))
            f.write(payload)
            f.write(PickleWriter().dump([k for k, _ in storages]))
            for _, arr in storages:
                f.write(struct.pack("<q", arr.size))
                f.write(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
        return path
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(archive_name + "/data.pkl", payload)
        zf.writestr(archive_name + "/byteorder", "little")
        for key, arr in storages:
            zf.writestr(archive_name + "/data/" + key, arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
        zf.writestr(archive_name + "/version", "3\n")
        zf.writestr(archive_name + "/.data/version", "3\n")
    return path
