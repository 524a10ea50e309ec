"""The whitelisting unpickler behind :mod:`mxvision.io.torchfile.reader` (no PyTorch, no code runs).

A ``.pt`` file is a pickle, which to plain :mod:`pickle` is a program. :class:`RestrictedUnpickler`
is a :class:`pickle.Unpickler` subclass whose :meth:`~RestrictedUnpickler.find_class` is a
whitelist, so the *only* callables a file can reach are the handful defined here, and they only
build NumPy arrays and inert records:

* tensors: ``torch._utils._rebuild_tensor`` / ``_rebuild_tensor_v2`` / ``_rebuild_tensor_v3`` /
  ``_rebuild_parameter`` / ``_rebuild_parameter_with_state`` and ``torch._tensor._rebuild_from_type_v2``
  are replaced by functions that slice a NumPy view out of the storage (bounds-checked);
* storages: ``torch.FloatStorage`` and the other typed storages (and ``torch.float32``-style
  dtypes) become dtype markers; their bytes come from the file's own storage records, never from
  the pickle;
* containers: ``collections.OrderedDict`` and the builtins ``set``/``frozenset`` (plain data);
* whole pickled models (``torch.save(model)``, how torchxrayvision published its DenseNet weights):
  classes under ``torch.nn.modules.*``, ``torchvision.models.*`` and ``torchxrayvision.*`` become
  :class:`ModuleRecord` -- an inert object that only stores the pickled ``__dict__`` (its
  ``_parameters``, ``_buffers`` and ``_modules``). The real class is never imported, so no
  ``__setstate__``/``__init__`` of the file's choosing runs. Pass ``allow_modules=False`` to
  accept state dicts only.

Anything else -- ``os.system``, ``builtins.eval``, ``numpy`` reconstructors, any other class --
is refused with a :class:`~mxvision.errors.WeightsError` naming it, before it could be called.
(Every way the pickle format has of reaching a callable -- the ``GLOBAL``/``STACK_GLOBAL``
opcodes and the ``copyreg`` extension registry -- goes through ``find_class``; persistent ids
are resolved by :meth:`~RestrictedUnpickler.persistent_load` here, also to data only.)
"""
import pickle
import re
from collections import OrderedDict

import numpy as np

from mxvision.errors import WeightsError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# PyTorch storage classes and dtype names -> NumPy dtype. bfloat16 has no NumPy dtype: its raw
# 16-bit words are kept and widened to float32 when the tensor is built.
_STORAGES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "UntypedStorage": np.uint8,
}
_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16, "bfloat16": "bfloat16", "int64": np.int64,
    "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16, "short": np.int16,
    "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
}
_MODULE_PREFIXES = ("torch.nn.modules.", "torchvision.models.", "torchxrayvision.")
_MAX_DIMS = 16
_CLASS_NAME = re.compile(r"_?[A-Z][A-Za-z0-9_]*")  # a class name (Conv2d, _DenseLayer), not a function


# --------------------------------------------------------------------------- inert stand-ins
class _DType:
    """A storage type or dtype named by the file (``torch.FloatStorage``, ``torch.float32``)."""

    def __init__(self, torch_name, dtype):
        self.torch_name = torch_name
        self.dtype = dtype

    @property
    def itemsize(self):
        return 2 if self.dtype == "bfloat16" else np.dtype(self.dtype).itemsize

    def __repr__(self):
        return "torch.%s" % self.torch_name


class Storage:
    """One storage record: its dtype, element count and (once read) its flat NumPy data.

    The reader creates one per storage key the pickle names (through the ``storages`` callback
    of :class:`RestrictedUnpickler`) and fills its bytes with :meth:`set_bytes`.
    """

    def __init__(self, key, dtype, numel):
        self.key = key
        self.dtype = dtype
        self.numel = numel
        self.data = None  # flat ndarray once the bytes are known

    def set_bytes(self, raw, source, byteorder="little"):
        need = self.numel * self.dtype.itemsize
        if len(raw) < need:
            raise WeightsError(source, "storage %r holds %d bytes, the file promises %d (truncated "
                               "or corrupt file)" % (self.key, len(raw), need))
        order = ">" if byteorder == "big" else "<"
        base = np.dtype(np.uint16 if self.dtype.dtype == "bfloat16" else self.dtype.dtype).newbyteorder(order)
        arr = np.frombuffer(raw, dtype=base, count=self.numel)
        self.data = arr


class _LazyTensor:
    """A tensor view (storage, offset, size, stride) resolved to an ndarray after loading."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class ModuleRecord:
    """An inert stand-in for a pickled ``torch.nn.Module`` (or any whitelisted module class).

    It records the class name the file asked for and the pickled ``__dict__``; it has no
    behaviour. :func:`state_dict_from` walks ``_parameters``/``_buffers``/``_modules`` like
    ``Module.state_dict()`` does.
    """

    torch_class = "?"

    def __setstate__(self, state):
        self.__dict__["_state"] = state if isinstance(state, dict) else {"state": state}

    @property
    def state(self):
        return self.__dict__.get("_state", {})

    def __repr__(self):
        return "<pickled %s>" % self.torch_class


_RECORD_CLASSES = {}


def _record_class(module, name):
    key = module + "." + name
    if key not in _RECORD_CLASSES:
        _RECORD_CLASSES[key] = type(name, (ModuleRecord,), {"torch_class": key,
                                                            "__module__": __name__})
    return _RECORD_CLASSES[key]


# --------------------------------------------------------------------------- tensor rebuilding
def _check_view(source, storage, offset, size, stride):
    if not isinstance(storage, Storage):
        raise WeightsError(source, "tensor refers to %r instead of a storage" % (storage,))
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride) or len(size) > _MAX_DIMS:
        raise WeightsError(source, "tensor has size %r and stride %r" % (size, stride))
    for v in (offset,) + size + stride:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise WeightsError(source, "tensor has a bad size/stride/offset (%r %r %r)"
                               % (size, stride, offset))
    if all(size):
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.numel:
            raise WeightsError(source, "tensor (offset %d, size %r, stride %r) reaches past its "
                               "storage of %d elements" % (offset, size, stride, storage.numel))
    return size, stride


def _materialize(t):
    data = t.storage.data
    if data is None:
        raise WeightsError(t.storage.key, "the file has no bytes for this storage")
    if not all(t.size):
        out = np.zeros(t.size, dtype=np.float32 if t.storage.dtype.dtype == "bfloat16" else data.dtype)
        return out
    step = data.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(data[t.offset:], shape=t.size,
                                           strides=tuple(s * step for s in t.stride), writeable=False)
    # a contiguous, native-order copy (reshape: as_strided ignores an empty shape)
    out = np.array(view, dtype=data.dtype.newbyteorder("=")).reshape(t.size)
    if t.storage.dtype.dtype == "bfloat16":
        out = (out.astype(np.uint32) << 16).view(np.float32)
    return out


def resolve_tensors(obj, memo=None):
    """Replace every lazy tensor view inside ``obj`` (containers and module records) by an ndarray.

    Called by the reader once every :class:`Storage` has its bytes (for the legacy format they
    follow the pickle); shared tensors stay shared, reference cycles are followed once."""
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, _LazyTensor):
        out = _materialize(obj)
    elif isinstance(obj, OrderedDict):
        out = OrderedDict((k, resolve_tensors(v, memo)) for k, v in obj.items())
    elif isinstance(obj, dict):
        out = {k: resolve_tensors(v, memo) for k, v in obj.items()}
    elif isinstance(obj, list):
        out = [resolve_tensors(v, memo) for v in obj]
    elif isinstance(obj, tuple):
        out = tuple(resolve_tensors(v, memo) for v in obj)
    elif isinstance(obj, ModuleRecord):
        memo[id(obj)] = obj
        obj.__dict__["_state"] = resolve_tensors(obj.state, memo)
        return obj
    else:
        out = obj
    memo[id(obj)] = out
    return out


# --------------------------------------------------------------------------- the restricted unpickler
class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that can only build tensors (as lazy views), containers and records.

    ``storages(key, dtype, numel)`` returns the :class:`Storage` for a persistent id; the zip
    reader fills its bytes at once, the legacy reader after the main pickle.
    """

    def __init__(self, file, source, storages, allow_modules=True):
        super().__init__(file)
        self.source = source
        self._storages = storages
        self.allow_modules = allow_modules

    # -- the whitelist
    def find_class(self, module, name):
        if module == "torch._utils":
            fn = {"_rebuild_tensor": self._rebuild_tensor, "_rebuild_tensor_v2": self._rebuild_tensor,
                  "_rebuild_tensor_v3": self._rebuild_tensor_v3,
                  "_rebuild_parameter": self._rebuild_parameter,
                  "_rebuild_parameter_with_state": self._rebuild_parameter}.get(name)
            if fn is not None:
                return fn
        elif module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return self._rebuild_from_type_v2
        elif module in ("torch", "torch.cuda") and name in _STORAGES:
            # torch.cuda.FloatStorage: saved from a GPU; the bytes are the same, read to the CPU
            return _DType(name, _STORAGES[name])
        elif module == "torch" and name in _DTYPES:
            return _DType(name, _DTYPES[name])
        elif (module, name) in (("torch", "Tensor"), ("torch.nn.parameter", "Parameter")):
            return _DType(name, None)  # a tensor type marker for _rebuild_from_type_v2; never called
        elif module == "collections" and name == "OrderedDict":
            return OrderedDict
        elif module in ("builtins", "__builtin__") and name in ("set", "frozenset"):
            return {"set": set, "frozenset": frozenset}[name]
        elif self.allow_modules and module.startswith(_MODULE_PREFIXES) and _CLASS_NAME.fullmatch(name):
            return _record_class(module, name)
        raise WeightsError(self.source, "refusing to load %s.%s: a weights file may only contain "
                           "tensors, plain containers and model layers (this file would run code on "
                           "load, or is not a weights file)" % (module, name))

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise WeightsError(self.source, "unsupported persistent id %r" % (pid,))
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module" and len(pid) >= 2 and isinstance(pid[1], type) \
                and issubclass(pid[1], ModuleRecord):
            return pid[1]  # legacy whole-model pickles name each module class this way
        if kind != "storage" or len(pid) not in (5, 6):
            raise WeightsError(self.source, "unsupported persistent id %r" % (pid[:2],))
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _DType) or storage_type.dtype is None:
            raise WeightsError(self.source, "storage of unknown type %r" % (storage_type,))
        if not isinstance(numel, int) or numel < 0:
            raise WeightsError(self.source, "storage %r has a bad size %r" % (key, numel))
        key = str(key)
        storage = self._storages(key, storage_type, numel)
        view = pid[5] if len(pid) == 6 else None
        if view is not None:  # legacy: a view into a bigger root storage
            view_key, offset, view_size = view
            return _StorageView(storage, int(offset), int(view_size))
        return storage

    # -- tensor builders: only slice views, never call anything else
    def _rebuild_tensor(self, storage, offset, size, stride, *_ignored):
        if isinstance(storage, _StorageView):
            offset, storage = offset + storage.offset, storage.root
        size, stride = _check_view(self.source, storage, offset, size, stride)
        return _LazyTensor(storage, offset, size, stride)

    def _rebuild_tensor_v3(self, storage, offset, size, stride, requires_grad, hooks, dtype, *_):
        return self._rebuild_tensor(storage, offset, size, stride)

    def _rebuild_parameter(self, data, *_ignored):
        if not isinstance(data, _LazyTensor):
            raise WeightsError(self.source, "parameter wraps %r instead of a tensor" % (type(data),))
        return data

    def _rebuild_from_type_v2(self, func, new_type, args, state):
        if func not in (self._rebuild_tensor, self._rebuild_tensor_v3, self._rebuild_parameter):
            raise WeightsError(self.source, "tensor subclass rebuilt by %r" % (func,))
        return func(*args)


class _StorageView:
    def __init__(self, root, offset, size):
        self.root, self.offset, self.size = root, offset, size
