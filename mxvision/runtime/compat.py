"""MXNet 1.9.1 on today's Python, NumPy and ONNX: the few names it reads that are gone.

MXNet 1.9.1 is the last release (the project is in the Apache Attic; apache/mxnet#21165 on
``np.bool`` stays open). Its wheel is ``py3-none`` and loads ``libmxnet.so`` through ctypes, so what
stops it on Python 3.12/3.13 with NumPy 1.26/2.x is a handful of Python-level names:

* NumPy names MXNet reads at import or in the code paths mxvision uses (:data:`NUMPY_NAMES`);
  each is set only where NumPy lacks it, to what NumPy itself had, never replacing an existing
  attribute (NumPy 2 has ``np.bool`` again, as its boolean scalar type: it is left alone);
* ``ndarray.tostring()`` (removed in NumPy 2.3) in ``mx.recordio.pack``/``pack_img``;
* ``onnx.mapping`` (removed in onnx 1.15; ``onnx<1.15`` has no wheel for Python 3.12+) in
  ``mx.onnx.export_model``;
* 1-element arrays passed where ctypes wants floats in INT8 calibration (NumPy 2).

:func:`install` (called by ``import mxvision``) puts a finder on ``sys.meta_path`` that applies the
NumPy names just before MXNet's first import, and the MXNet patches right after it; NumPy, MXNet
and onnx are not imported until something imports MXNet, so ``import mxvision`` stays light.
Importing MXNet before mxvision (``import mxnet; import mxvision``) works where MXNet imports
by itself, i.e. with NumPy < 1.24; elsewhere import mxvision first.
"""
import contextlib
import importlib.abc
import importlib.util
import math
import sys
import types
import warnings

#: name -> (what NumPy had, built lazily from NumPy; the MXNet 1.9.1 line that reads it). Exactly
#: the names without which ``import mxnet`` fails on NumPy 1.26 (``bool``) or 2.5 (the rest),
#: found by removing each in turn (docs/COMPATIBILITY.md has the command). ``None``: NumPy's
#: financial functions, moved to numpy_financial in NumPy 1.20, which MXNet only lists (calling
#: one raises NotImplementedError naming that package).
_DISPATCH = "mxnet/numpy_dispatch_protocol.py:220 `getattr(_np, op_name)` over the list, line"
_FALLBACK = "mxnet/numpy/fallback.py"
NUMPY_NAMES = {
    # removed in NumPy 1.24 as an alias of the builtin; NumPy 2 defines np.bool again (its own
    # boolean scalar type), which is left alone
    "bool": (lambda np: bool, "mxnet/numpy/utils.py:37 `bool = onp.bool`"),
    # removed in NumPy 2.0
    "PZERO": (lambda np: 0.0, "mxnet/numpy/utils.py:42 `PZERO = onp.PZERO`"),
    "NZERO": (lambda np: -0.0, "mxnet/numpy/utils.py:43 `NZERO = onp.NZERO`"),
    "NINF": (lambda np: -math.inf, "mxnet/numpy/utils.py:44 `NINF = onp.NINF`"),
    "PINF": (lambda np: math.inf, "mxnet/numpy/utils.py:45 `PINF = onp.PINF`"),
    "NAN": (lambda np: math.nan, "mxnet/numpy/utils.py:47 `NAN = onp.NAN`"),
    "NaN": (lambda np: math.nan, "mxnet/numpy/utils.py:48 `NaN = onp.NaN`"),
    "Inf": (lambda np: math.inf, "mxnet/gluon/contrib/estimator/event_handler.py:248 "
                                 "`priority=np.Inf` (a default argument, read at import)"),
    "sometrue": (lambda np: np.any, _DISPATCH + " 87 'sometrue'"),
    "round_": (lambda np: np.round, _DISPATCH + " 92 'round_'"),
    "product": (lambda np: np.prod, _DISPATCH + " 124 'product'"),
    "alltrue": (lambda np: np.all, _FALLBACK + ":111 `alltrue = onp.alltrue`"),
    "msort": (lambda np: (lambda a: np.sort(a, axis=0)), _FALLBACK + ":145 `msort = onp.msort`"),
    # removed in NumPy 2.4 / 2.5 (deprecated in 2.0)
    "in1d": (lambda np: (lambda ar1, ar2, assume_unique=False, invert=False:
                         np.isin(np.ravel(ar1), ar2, assume_unique=assume_unique, invert=invert)),
             _FALLBACK + ":135 `in1d = onp.in1d`"),
    "trapz": (lambda np: np.trapezoid, _FALLBACK + ":190 `trapz = onp.trapz`"),
    # moved to numpy_financial in NumPy 1.20
    "mirr": (None, _FALLBACK + ":143 `mirr = onp.mirr`"),
    "npv": (None, _FALLBACK + ":160 `npv = onp.npv`"),
    "pmt": (None, _FALLBACK + ":164 `pmt = onp.pmt`"),
    "ppmt": (None, _FALLBACK + ":173 `ppmt = onp.ppmt`"),
    "pv": (None, _FALLBACK + ":176 `pv = onp.pv`"),
    "rate": (None, _FALLBACK + ":177 `rate = onp.rate`"),
}


def _financial(name):
    def gone(*args, **kwargs):
        raise NotImplementedError(f"numpy.{name} moved to the numpy_financial package in NumPy 1.20")
    gone.__name__ = name
    return gone


def restore_numpy_names():
    """Set the names of :data:`NUMPY_NAMES` that this NumPy lacks; returns the names set.

    A name counts as missing only if reading it raises AttributeError. NumPy serves some removed
    or deprecated names through its module ``__getattr__`` with a warning (``np.bool`` on NumPy
    1.20-1.23); those are left alone, warning included, so NumPy behaves for the user's code
    exactly as it did (the probe itself is silenced, so ``-W error`` does not turn it into one)."""
    import numpy as np

    restored = []
    for name, (make, _) in NUMPY_NAMES.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                getattr(np, name)
            continue
        except AttributeError:
            pass
        try:
            value = make(np) if make is not None else _financial(name)
        except AttributeError:  # e.g. np.trapezoid on NumPy < 2.0, where np.trapz still exists
            continue
        setattr(np, name, value)
        restored.append(name)
    return restored


def _pack(mx_recordio, np):
    """``mx.recordio.pack`` as in MXNet 1.9.1, with ``tobytes()`` for the removed ``tostring()``
    (mxnet/recordio.py:392). Called by ``pack_img`` (mxnet/recordio.py:508, also patched)."""
    import struct

    def pack(header, s):
        header = mx_recordio.IRHeader(*header)
        if isinstance(header.label, (int, float)):
            header = header._replace(flag=0)
            s = struct.pack(mx_recordio._IR_FORMAT, *header) + s
        else:
            label = np.asarray(header.label, dtype=np.float32)
            header = header._replace(flag=label.size, label=0)
            s = struct.pack(mx_recordio._IR_FORMAT, *header) + label.tobytes() + s
        return s

    def pack_img(header, img, quality=95, img_fmt=".jpg"):
        import cv2

        jpg_formats, png_formats = [".JPG", ".JPEG"], [".PNG"]
        encode_params = None
        if img_fmt.upper() in jpg_formats:
            encode_params = [cv2.IMWRITE_JPEG_QUALITY, quality]
        elif img_fmt.upper() in png_formats:
            encode_params = [cv2.IMWRITE_PNG_COMPRESSION, quality]
        ret, buf = cv2.imencode(img_fmt, img, encode_params)
        assert ret, "failed to encode image"
        return pack(header, buf.tobytes())

    return pack, pack_img


def patch_quantization(mx_quantization):
    """Calibration thresholds reach ``c_array(ctypes.c_float, min_vals)``
    (mxnet/contrib/quantization.py:255) as 1-element arrays, which NumPy 2 no longer converts to a
    Python float: give that module a ``c_array`` that takes each value's ``item()`` first."""
    from mxnet import base

    if getattr(mx_quantization.c_array, "mxvision_compat", False):
        return False

    def c_array(ctype, values):
        return base.c_array(ctype, [v.item() if hasattr(v, "item") else v for v in values])

    c_array.mxvision_compat = True
    mx_quantization.c_array = c_array
    return True


def patch_recordio(mx_recordio):
    """Give ``mx.recordio`` a pack/pack_img that works without ``ndarray.tostring``."""
    import numpy as np

    if hasattr(np.ndarray, "tostring"):
        return False
    mx_recordio.pack, mx_recordio.pack_img = _pack(mx_recordio, np)
    return True


def onnx_mapping_module():
    """An ``onnx.mapping`` for ``mx.onnx`` (mxnet/onnx/mx2onnx/_export_model.py:99 and
    _export_onnx.py:162 import it; 55 uses of NP_TYPE_TO_TENSOR_TYPE and TENSOR_TYPE_TO_NP_TYPE)
    where onnx >= 1.15 removed it, built from ``onnx.helper``'s own dtype tables."""
    import numpy as np
    from onnx import TensorProto, helper

    to_np = {}
    for code in TensorProto.DataType.values():
        try:
            to_np[code] = np.dtype(helper.tensor_dtype_to_np_dtype(code))
        except (KeyError, TypeError, ValueError):  # UNDEFINED, STRING, the FLOAT8 kinds
            continue
    from_np = {}
    for code, dtype in sorted(to_np.items()):  # the first code per dtype: FLOAT (1) before others
        from_np.setdefault(dtype, code)
    module = types.ModuleType("onnx.mapping", "dtype tables restored by mxvision.runtime.compat")
    module.TENSOR_TYPE_TO_NP_TYPE, module.NP_TYPE_TO_TENSOR_TYPE = to_np, from_np
    return module


class _OnnxMappingLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return onnx_mapping_module()

    def exec_module(self, module):
        sys.modules["onnx"].mapping = module


class _OnnxMapping(importlib.abc.MetaPathFinder):
    """Last on ``sys.meta_path``: consulted only when no installed onnx provides onnx.mapping."""

    def find_spec(self, name, path=None, target=None):
        if name != "onnx.mapping":
            return None
        return importlib.util.spec_from_loader(name, _OnnxMappingLoader())


_ABSENT = object()


@contextlib.contextmanager
def _hidden(name):
    """While inside, ``import name`` raises ImportError; afterwards ``sys.modules`` holds for it
    what it held before (nothing, or the module already imported)."""
    saved = sys.modules.get(name, _ABSENT)
    sys.modules[name] = None  # `import name` raises ImportError while this is set
    try:
        yield
    finally:
        if saved is _ABSENT:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = saved


def import_gluoncv():
    """GluonCV, imported even where torch >= 2 is installed (the parity suite's venv, or a user's).

    gluoncv 0.10.5's ``__init__`` (gluoncv/__init__.py:27) calls
    ``check._require_pytorch_version('1.4.0', '2.0.0')`` for its PyTorch half, which mxvision does
    not use, and raises RuntimeError when a newer torch is importable; its own check skips when
    ``import torch`` fails. So torch is hidden for that one import and put back after."""
    if "gluoncv" in sys.modules:
        return sys.modules["gluoncv"]
    with _hidden("torch"):
        import gluoncv
    return gluoncv


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        if "sklearn" in sys.modules:
            self.loader.exec_module(module)
        else:
            # mxnet/model.py:45 imports sklearn.base only to derive the legacy FeedForward API
            # (unused by mxvision) from BaseEstimator: that import pulls in scikit-learn, SciPy and
            # pandas, 0.5-0.7 s of every command's start-up. Hidden, MXNet takes its own fallback
            # (`BASE_ESTIMATOR = object`); sklearn imports normally afterwards.
            with _hidden("sklearn"):
                self.loader.exec_module(module)
        patch_recordio(module.recordio)
        patch_quantization(module.contrib.quantization)


class _BeforeMXNet(importlib.abc.MetaPathFinder):
    """Restores the NumPy names when ``mxnet`` is first looked up, then patches it once loaded."""

    def find_spec(self, name, path=None, target=None):
        if name != "mxnet":
            return None
        uninstall()
        restore_numpy_names()
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader)
        return spec


def install():
    """Arrange for :func:`restore_numpy_names` and the MXNet patches around MXNet's first import
    (at once, if MXNet is already imported). Idempotent."""
    if "mxnet" in sys.modules:
        restore_numpy_names()
        patch_recordio(sys.modules["mxnet"].recordio)
        patch_quantization(sys.modules["mxnet"].contrib.quantization)
    elif not any(isinstance(f, _BeforeMXNet) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeMXNet())
    if not any(isinstance(f, _OnnxMapping) for f in sys.meta_path):
        sys.meta_path.append(_OnnxMapping())


def uninstall():
    """Remove the MXNet finder (it acts once); the onnx.mapping one stays, it acts only when needed."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _BeforeMXNet)]
