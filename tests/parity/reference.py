"""The reference side of the parity suite: torch, torchvision (or its stand-in) and torchxrayvision.

Every ``tests/parity/test_*_parity.py`` imports this module first: importing it skips the test
module (or, under CI=true on Python 3.11, fails it) when torch or torchxrayvision is missing,
registers the torchvision stand-in when no real torchvision imports, and gives the helpers the
suites share -- torchxrayvision's own preprocessing of a file, the real sample films, and the
random-but-realistic initialisation (BatchNorm statistics from real images, O(1) logits).
"""
import importlib
import os
import sys
import warnings

import numpy as np
import pytest

from mxvision.runtime import shared_dir

#: CI installs the parity suite's torch (the CPU wheel of 2.13.0 on this machine kind's disk) on
#: Python 3.11 only; elsewhere any torch from PyPI is a CUDA build of several GB, so the suite skips.
PARITY_PYTHON = (3, 11)
IN_CI = os.environ.get("CI", "").lower() == "true" and sys.version_info[:2] == PARITY_PYTHON
INSTALL = "`make setup-parity` (part of `make test`) installs it (README: Two commands)"


def _unavailable(problem, fix=INSTALL, module_level=True):
    """Skip (a developer without the extra), or fail under CI=true (a broken install)."""
    message = "parity suite: %s; %s" % (problem, fix)
    if IN_CI:
        pytest.fail(message + " -- CI=true, so this fails instead of skipping", pytrace=False)
    pytest.skip(message, allow_module_level=module_level)


def _import(name):
    """The module, or None with the reason (so the skip or failure is not a chained traceback)."""
    try:
        return importlib.import_module(name), None
    except ImportError as err:
        return None, str(err)


torch, _why = _import("torch")
if torch is None:
    _unavailable("torch is not installed (%s)" % _why)


def _import_torchvision():
    """The real torchvision if it imports (with the schemas if needed), else the stand-in."""
    try:
        import torchvision  # noqa: F401
        return "torchvision %s" % torchvision.__version__
    except ImportError:
        import torchvision_stand_in
        return torchvision_stand_in.install().__version__
    except RuntimeError as err:  # a CUDA wheel without its ops: "operator torchvision::nms does not exist"
        if "torchvision::" not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    global _TV_SCHEMAS
    _TV_SCHEMAS = torch.library.Library("torchvision", "DEF")  # kept alive for the process
    _TV_SCHEMAS.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TV_SCHEMAS.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401,F811
    return "torchvision %s (operator schemas defined for the CPU torch)" % torchvision.__version__


TORCHVISION = _import_torchvision()
xrv_torch, _why = _import("torchxrayvision")
if xrv_torch is None:
    _unavailable("torchxrayvision is not installed (%s)" % _why)


RASTER = ["16747_3_1.jpg", "00000001_000.png", "00027426_000.png"]
DICOM = ["Fake_MONOHR1.dcm", "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"]


def torchxrayvision_input(path, size):
    """The model card's preprocessing, with torchxrayvision's own functions."""
    import skimage.io
    if path.endswith(".dcm"):
        img = xrv_torch.utils.read_xray_dcm(path)
    else:
        img = xrv_torch.datasets.normalize(skimage.io.imread(path), 255)
        if img.ndim == 3:
            img = img.mean(2)
    img = xrv_torch.datasets.XRayCenterCrop()(img[None, ...])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return xrv_torch.datasets.XRayResizer(size)(img)


def sample_paths():
    """The real sample films of ../shared/data/samples by name (skip, or fail under CI, without them)."""
    root = shared_dir()
    if root is None:
        _unavailable("../shared (the real sample images) is absent", "set MXVISION_SHARED to its path",
                     module_level=False)
    return {n: str(root / "data" / "samples" / n) for n in RASTER + DICOM}


def realistic_batchnorm(model, batch, seed):
    """Seed torch, give every BatchNorm random affine parameters and the statistics of a
    training-mode pass over ``batch`` (real films); the model is left in eval mode and its
    outputs on ``batch`` are returned, for the caller to scale its head to O(1) outputs."""
    torch.manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None  # cumulative average over the pass
            torch.nn.init.uniform_(mod.weight, 0.5, 1.5)
            torch.nn.init.uniform_(mod.bias, -0.2, 0.2)
    model.train()
    with torch.no_grad():
        model(batch)
        model.eval()
        return model(batch)


def realistic(model, head, batch, seed):
    """BatchNorm statistics from real images, then a classifier giving O(1) logits."""
    logits = realistic_batchnorm(model, batch, seed)
    with torch.no_grad():
        head.weight.mul_(2.0 / float(logits.std()))
        torch.nn.init.uniform_(head.bias, -1.0, 1.0)
    return model
