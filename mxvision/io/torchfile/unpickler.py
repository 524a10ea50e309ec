"""The whitelisting unpickler behind :mod:`mxvision.io.torchfile.reader` (no PyTorch, no code runs).

A ``.pt`` file is a pickle, which to plain :mod:`pickle` is a program. :class:`RestrictedUnpickler`
is a :class:`pickle.Unpickler` subclass whose :meth:`~RestrictedUnpickler.find_class` is a
whitelist, so the *only* callables a file can reach are the handful defined here, and they only
build NumPy arrays and inert records:

* tensors: ``torch._utils._rebuild_tensor`` / ``_rebuild_tensor_v2`` / ``_rebuild_tensor_v3`` /
  ``_rebuild_parameter`` / ``_rebuild_parameter_with_state`` and ``torch._tensor._rebuild_from_type_v2``
  are replaced by functions that copy a NumPy array out of the storage, after checking the
  size/stride/offset arithmetic against the storage and the bytes against a budget;
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

* PyTorch Lightning checkpoints (``trainer.save_checkpoint``, how torchxrayvision publishes the
  MIRA sex model): Lightning before 1.5 keys each callback's saved state by the callback's
  *class* (``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint``), so the pickle names
  that class -- as a dict key, never to call it. Classes under ``pytorch_lightning.callbacks.`` /
  ``lightning.pytorch.callbacks.`` become a :class:`ClassReference`: an inert, hashable marker
  that cannot be called or instantiated. Lightning's other globals -- the ``AttributeDict`` of
  ``save_hyperparameters()``, pickled modules, loggers -- are refused like any other class: the
  checkpoint torchxrayvision ships was trained by biomedia-mira/chexploration's
  ``prediction/chexpert.sex.py``, whose LightningModule saves no hyper-parameters, and a file
  that has them can still be read by saving its ``state_dict`` entry alone (the message says so).

Anything else -- ``os.system``, ``builtins.eval``, ``numpy`` reconstructors, any other class --
is refused with a :class:`~mxvision.errors.WeightsError` naming it, before it could be called.
(Every way the pickle format has of reaching a callable -- the ``GLOBAL``/``STACK_GLOBAL``
opcodes and the ``copyreg`` extension registry -- goes through ``find_class``; persistent ids
are resolved by :meth:`~RestrictedUnpickler.persistent_load` here, also to data only.)

The pickle's ``BUILD`` opcode sets attributes of any object it is pointed at; every object this
module hands the unpickler either has its own ``__setstate__`` (records keep the state, the
OrderedDict ignores it -- PyTorch stores ``_metadata`` there -- the markers refuse it) or no
``__dict__`` at all, so a file can neither shadow an OrderedDict's ``items`` nor rewrite a
storage's size after it was checked. Before any of this, :func:`~.scan.scan_pickle` bounds the
pickle's size, object count and nesting.
"""
import io
import math
import pickle
import re
import struct
from collections import OrderedDict

import numpy as np

from mxvision.errors import WeightsError, one_line
from mxvision.io.torchfile.scan import scan_pickle

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
_LIGHTNING_CALLBACKS = ("pytorch_lightning.callbacks.", "lightning.pytorch.callbacks.")
_LIGHTNING = ("pytorch_lightning.", "lightning.", "lightning_fabric.")
_MAX_DIMS = 16
MAX_EXTENT = 1 << 48  # any size, stride, offset or element count beyond this is not a weight
_CLASS_NAME = re.compile(r"_?[A-Z][A-Za-z0-9_]*")  # a class name (Conv2d, _DenseLayer), not a function


def describe(value):
    """A short, one-level description of a value from a file, safe to put in a message: never
    recursive (a self-containing list, ten thousand nested tuples) and never long."""
    if value is None or isinstance(value, (bool, float)):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if abs(value) < 1 << 64 else "an integer of %d bits" % value.bit_length()
    if isinstance(value, (str, bytes)):
        return repr(value[:60]) + ("..." if len(value) > 60 else "")
    if isinstance(value, tuple) and len(value) <= _MAX_DIMS \
            and all(v is None or isinstance(v, (int, float)) and abs(v) < 1 << 64 for v in value):
        return repr(value)
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        return "a %s of %d items" % (type(value).__name__, len(value))
    return "a %s" % type(value).__name__


def size_text(nbytes):
    """``nbytes`` for a message: ``12.3 MB``."""
    return "%.1f MB" % (nbytes / 1e6) if nbytes < 1e12 else "%.1f TB" % (nbytes / 1e12)


# --------------------------------------------------------------------------- inert stand-ins
class _Inert:
    """Base of the markers handed to the unpickler: a file may not change them (``BUILD``)."""

    def __setstate__(self, state):
        raise pickle.UnpicklingError("the file tries to set attributes of a %s" % type(self).__name__)


class _DType(_Inert):
    """A storage type or dtype named by the file (``torch.FloatStorage``, ``torch.float32``)."""

    def __init__(self, torch_name, dtype):
        self.torch_name = torch_name
        self.dtype = dtype

    @property
    def itemsize(self):
        return 2 if self.dtype == "bfloat16" else np.dtype(self.dtype).itemsize

    @property
    def tensor_itemsize(self):
        """Bytes per element of the tensors built from it (bfloat16 is widened to float32)."""
        return 4 if self.dtype == "bfloat16" else self.itemsize

    def __repr__(self):
        return "torch.%s" % self.torch_name


class ClassReference(_Inert):
    """A class the file names only to use it as a value or key (a Lightning callback's class
    keying its saved state). Not callable, not instantiable: ``REDUCE`` or ``NEWOBJ`` on it fail."""

    def __init__(self, dotted_name):
        self.dotted_name = dotted_name

    def __repr__(self):
        return "<class %s>" % self.dotted_name


class Storage(_Inert):
    """One storage record: its dtype, element count and (once read) its flat NumPy data.

    The reader creates one per storage key the pickle names (through the ``storages`` callback
    of :class:`RestrictedUnpickler`) and fills its bytes with :meth:`set_bytes`.
    """

    def __init__(self, key, dtype, numel):
        self.key = key
        self.dtype = dtype
        self.numel = numel
        self.data = None  # flat ndarray of exactly numel elements once the bytes are known

    @property
    def nbytes(self):
        return self.numel * self.dtype.itemsize

    def set_bytes(self, raw, source, byteorder="little"):
        if len(raw) < self.nbytes:
            raise WeightsError(source, "storage %s holds %d bytes, the file promises %d (truncated "
                               "or corrupt file)" % (describe(self.key), len(raw), self.nbytes))
        order = ">" if byteorder == "big" else "<"
        base = np.dtype(np.uint16 if self.dtype.dtype == "bfloat16" else self.dtype.dtype).newbyteorder(order)
        self.data = np.frombuffer(raw, dtype=base, count=self.numel)


class _StorageView(_Inert):
    """A legacy-format view: ``size`` elements of ``root`` from ``offset``."""

    def __init__(self, root, offset, size):
        self.root, self.offset, self.size = root, offset, size


class _Pending(_Inert):
    """A checked tensor whose storage bytes are not read yet (the legacy format's first pass)."""


class PickledOrderedDict(OrderedDict):
    """``collections.OrderedDict`` as a file builds it. PyTorch pickles a state dict's
    ``_metadata`` as the OrderedDict's state; it is dropped, so a file cannot set attributes
    (an ``items`` that shadows the method) on it."""

    def __setstate__(self, state):
        pass


class ModuleRecord:
    """An inert stand-in for a pickled ``torch.nn.Module`` (or any whitelisted module class).

    It records the class name the file asked for and the pickled ``__dict__``; it has no
    behaviour. :func:`~mxvision.io.torchfile.reader.state_dict_from` walks
    ``_parameters``/``_buffers``/``_modules`` like ``Module.state_dict()`` does.
    """

    torch_class = "?"

    def __setstate__(self, state):
        self.__dict__["_state"] = state if isinstance(state, dict) else {"state": state}

    @property
    def state(self):
        return self.__dict__.get("_state", {})

    def __repr__(self):
        return "<pickled %s>" % self.torch_class


# --------------------------------------------------------------------------- tensor rebuilding
def _whole(value):
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_EXTENT


def _copy_out(storage, offset, size, stride):
    """A contiguous, native-order copy of the checked view (bfloat16 widened to float32)."""
    data = storage.data
    out_dtype = np.float32 if storage.dtype.dtype == "bfloat16" else data.dtype.newbyteorder("=")
    if not all(size):
        return np.zeros(size, dtype=out_dtype)
    if offset + sum((n - 1) * s for n, s in zip(size, stride)) >= data.size:  # checked already; never read past
        raise pickle.UnpicklingError("a tensor reaches past the bytes read for its storage")
    step = data.dtype.itemsize
    strides = tuple(s * step if n > 1 else 0 for n, s in zip(size, stride))
    view = np.lib.stride_tricks.as_strided(data[offset:], shape=size, strides=strides, writeable=False)
    out = np.array(view, dtype=data.dtype.newbyteorder("=")).reshape(size)  # as_strided drops ()
    if storage.dtype.dtype == "bfloat16":
        out = (out.astype(np.uint32) << 16).view(np.float32)
    return out


# --------------------------------------------------------------------------- the restricted unpickler
class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that can only build tensors, containers and inert records.

    ``file`` is an in-memory binary file positioned at the pickle; its opcodes are checked by
    :func:`~.scan.scan_pickle` first, and ``file`` is left just past this pickle (the legacy
    format holds several in a row). ``storages(key, dtype, numel)`` returns the :class:`Storage`
    for a persistent id: with its bytes (the zip format), tensors are copied out at once; without
    (the legacy format's first pass), they are checked and stand as placeholders. Tensor copies
    may total at most ``max_tensor_bytes`` (None: no limit).
    """

    def __init__(self, file, source, storages, allow_modules=True, max_tensor_bytes=None):
        self.source = source
        self.payload = scan_pickle(file, source)
        super().__init__(io.BytesIO(self.payload))
        self._storages = storages
        self.allow_modules = allow_modules
        self.max_tensor_bytes = max_tensor_bytes
        self.tensor_bytes = 0
        self._record_classes = {}

    def load(self):
        """The object, or :class:`~mxvision.errors.WeightsError` naming the file for any failure."""
        try:
            return super().load()
        except WeightsError:
            raise
        except RecursionError:  # cannot happen after scan_pickle; never a traceback all the same
            raise WeightsError(self.source, "corrupt or hostile pickle data (nested too deeply)") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
                AttributeError, struct.error, OverflowError) as err:
            raise WeightsError(self.source, "corrupt or unsupported pickle data (%s: %s)"
                               % (type(err).__name__, one_line(err, 160))) from None

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
            return PickledOrderedDict
        elif module in ("builtins", "__builtin__") and name in ("set", "frozenset"):
            return {"set": set, "frozenset": frozenset}[name]
        elif self.allow_modules and module.startswith(_MODULE_PREFIXES) and _CLASS_NAME.fullmatch(name):
            return self._record_class(module, name)
        elif module.startswith(_LIGHTNING_CALLBACKS) and _CLASS_NAME.fullmatch(name):
            return ClassReference(module + "." + name)
        hint = ""
        if module.startswith(_LIGHTNING):
            hint = ("; in a PyTorch Lightning checkpoint mxvision reads tensors, plain data and callback "
                    "class names only -- save checkpoint['state_dict'] alone with torch.save and pass that file")
        raise WeightsError(self.source, "refusing to load %s.%s: a weights file may only contain "
                           "tensors, plain containers and model layers (this file would run code on "
                           "load, or is not a weights file)%s" % (one_line(module, 80), one_line(name, 80), hint))

    def _record_class(self, module, name):
        """One inert record class per name, per file (so no file changes another's classes)."""
        key = module + "." + name
        if key not in self._record_classes:
            self._record_classes[key] = type(name, (ModuleRecord,), {"torch_class": key,
                                                                     "__module__": __name__})
        return self._record_classes[key]

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise WeightsError(self.source, "unsupported persistent id (%s)" % describe(pid))
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module" and len(pid) >= 2 and isinstance(pid[1], type) \
                and issubclass(pid[1], ModuleRecord):
            return pid[1]  # legacy whole-model pickles name each module class this way
        if kind != "storage" or len(pid) not in (5, 6):
            raise WeightsError(self.source, "unsupported persistent id (%s)" % describe(pid[:2]))
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _DType) or storage_type.dtype is None:
            raise WeightsError(self.source, "storage of unknown type %s" % describe(storage_type))
        if isinstance(key, int) and not isinstance(key, bool) and 0 <= key < 1 << 63:
            key = str(key)
        if not isinstance(key, str) or not 0 < len(key) <= 64:
            raise WeightsError(self.source, "storage key %s is not a short name" % describe(key))
        if not _whole(numel):
            raise WeightsError(self.source, "storage %s has an impossible size %s" % (describe(key), describe(numel)))
        storage = self._storages(key, storage_type, numel)
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return storage
        # legacy: a view into a bigger root storage
        if not (isinstance(view, tuple) and len(view) == 3 and _whole(view[1]) and _whole(view[2])
                and view[1] + view[2] <= storage.numel):
            raise WeightsError(self.source, "storage view %s does not fit storage %s of %d elements"
                               % (describe(view), describe(key), storage.numel))
        return _StorageView(storage, view[1], view[2])

    # -- tensor builders: only copy checked views, never call anything else
    def _check_view(self, storage, offset, size, stride):
        """``(storage, offset, size, stride)`` after checking every element of the view lies in
        the storage and the copy fits the budget; all arithmetic in Python integers."""
        extent = None
        if isinstance(storage, _StorageView):
            extent, base, storage = storage.size, storage.offset, storage.root
        else:
            base = 0
        if not isinstance(storage, Storage):
            raise WeightsError(self.source, "tensor refers to %s instead of a storage" % describe(storage))
        if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)) \
                or len(size) != len(stride) or len(size) > _MAX_DIMS:
            raise WeightsError(self.source, "tensor has size %s and stride %s" % (describe(size), describe(stride)))
        size, stride = tuple(size), tuple(stride)
        if not all(_whole(v) for v in (offset,) + size + stride):
            raise WeightsError(self.source, "tensor has an impossible size/stride/offset (%s %s %s)"
                               % (describe(size), describe(stride), describe(offset)))
        extent = storage.numel - base if extent is None else extent
        numel = math.prod(size)
        if numel:
            last = offset + sum((n - 1) * s for n, s in zip(size, stride))
            if last >= extent:
                raise WeightsError(self.source, "tensor (offset %d, size %s, stride %s) reaches past its "
                                   "storage of %d elements" % (offset, describe(size), describe(stride), extent))
        nbytes = numel * storage.dtype.tensor_itemsize
        self.tensor_bytes += nbytes
        if self.max_tensor_bytes is not None and self.tensor_bytes > self.max_tensor_bytes:
            raise WeightsError(self.source, "its tensors would take more than %s (a tensor of size %s "
                               "alone needs %s); too large for these weights, or hostile"
                               % (size_text(self.max_tensor_bytes), describe(size), size_text(nbytes)))
        return storage, base + offset, size, stride

    def _rebuild_tensor(self, storage, offset, size, stride, *_ignored):
        storage, offset, size, stride = self._check_view(storage, offset, size, stride)
        if storage.data is None:
            return _Pending()
        return _copy_out(storage, offset, size, stride)

    def _rebuild_tensor_v3(self, storage, offset, size, stride, requires_grad, hooks, dtype, *_):
        return self._rebuild_tensor(storage, offset, size, stride)

    def _rebuild_parameter(self, data, *_ignored):
        if not isinstance(data, (np.ndarray, _Pending)):
            raise WeightsError(self.source, "parameter wraps %s instead of a tensor" % describe(data))
        return data

    def _rebuild_from_type_v2(self, func, new_type, args, state):
        if func not in (self._rebuild_tensor, self._rebuild_tensor_v3, self._rebuild_parameter):
            raise WeightsError(self.source, "tensor subclass rebuilt by %s" % describe(func))
        if not isinstance(args, tuple):
            raise WeightsError(self.source, "tensor rebuilt from %s" % describe(args))
        return func(*args)
