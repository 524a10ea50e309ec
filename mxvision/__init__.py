"""mxvision: the Xvision chest X-ray transfer-learning pipeline and torchxrayvision-style models in MXNet/Gluon.

The public API, one namespace for the whole pipeline::

    import mxvision as mxv

    store = mxv.extract_features("index.csv", "features", weights="imagenet")
    mxv.train_head(store, "run", epochs=20)
    report = mxv.evaluate_run("run", "features", "eval")
    mxv.export_model("run", "model/xvision")
    mxv.classify(["a.png"], model="densenet121-res224-all")

Each name is loaded from its module on first use (PEP 562), so ``import mxvision`` takes under
2 ms and imports no MXNet (which takes about a second): the CLI's ``--help``,
``mxvision.runtime.use_every_core`` (which must run before MXNet is imported) and the error
classes stay usable without it. The error classes
import nothing heavy and are bound at once. Names not listed here live in their modules
(``mxvision.data.splits``, ``mxvision.audit.explain``, ...); CONTRIBUTING.md describes the layout.
"""
import importlib
import os

# OpenCV reads its own decoder size limit once, when cv2 loads: set it to mxvision's MAX_PIXELS
# (mxvision.io.headers) before any module imports cv2, as a second line behind the header checks.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", "100000000")

# MXNet reads OMP_NUM_THREADS once, when it loads, and without it uses half the cores. Set it here,
# where every entry point passes before any module can import MXNet (the CLI's parser already
# imports it through the model registry); a value the user exported is kept.
from mxvision.runtime import compat, use_amx, use_every_core  # noqa: E402

use_every_core()
# MXNet 1.9.1's oneDNN uses AMX (INT8 1.4-1.6x faster) only if told so before it loads, and only
# in a process that asked Linux for the AMX state: both here, on CPUs that have it.
use_amx()
# MXNet 1.9.1 on NumPy >= 1.24, onnx >= 1.15 (Python 3.12/3.13): the names it reads that are gone
# are restored when MXNet is first imported (nothing is imported here).
compat.install()

from mxvision.errors import BadImage, BadIndex, BadRun, DownloadError, MxvisionError, WeightsError  # noqa: E402

__version__ = "0.1.0"

# Public name -> the module that defines it, in the order the data flows.
_HOMES = {
    # files -> arrays
    "read_image": "mxvision.io.images",
    # sources -> index -> network input
    "read_index": "mxvision.data.index",
    "write_index": "mxvision.data.index",
    "XrayDataset": "mxvision.data.dataset",
    "make_synthetic_dataset": "mxvision.data.synth",
    "get_preset": "mxvision.data.transforms",
    "load_image": "mxvision.data.transforms",
    "load_batch": "mxvision.data.transforms",
    # networks
    "get_model": "mxvision.models.zoo",
    "list_models": "mxvision.models.zoo",
    "build_backbone": "mxvision.models.zoo",
    # features -> head -> results
    "extract_features": "mxvision.features.extract",
    "FeatureStore": "mxvision.features.store",
    "train_head": "mxvision.train.loop",
    "finetune_run": "mxvision.train.finetune",
    "evaluate_run": "mxvision.evaluate",
    "load_classifier": "mxvision.train.loop",
    "predict": "mxvision.inference",
    "export_model": "mxvision.export",
    "load_exported": "mxvision.export",
    "classify": "mxvision.inference",
    "run_demo": "mxvision.demo",
    # does the model see the nodule?
    "explainer_from_run": "mxvision.audit.explain",
    "explainer_from_xrv": "mxvision.audit.explain",
    "shortcut_audit": "mxvision.audit.shortcuts",
    "make_lesion_pairs": "mxvision.audit.lesion",
}
_ERRORS = ("MxvisionError", "BadImage", "BadIndex", "DownloadError", "WeightsError", "BadRun")

__all__ = list(_HOMES) + list(_ERRORS)


def __getattr__(name):
    """Import a public name's module on first use and keep the name, so later lookups are plain."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'mxvision' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
