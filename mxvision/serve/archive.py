"""Model archives (``.mar``) for MXNet Model Server: one exported network, what it needs to score
an upload exactly as ``predict``/``classify`` do, and the handler MMS calls.

A ``.mar`` is a zip with ``MAR-INF/MANIFEST.json`` (the layout ``model-archiver`` 1.0.3 writes:
runtime, model name, ``handler`` as ``module:function``). mxvision writes it directly -- it is a
zip and one small JSON, and ``model-archiver`` is unmaintained -- and adds:

* ``model-symbol.json`` + ``model-0000.params``: the hybridized network (Xvision: backbone + head +
  softmax, as ``mxvision export``; torchxrayvision port: the network up to its logits, the
  calibration being applied by the handler as ``classify`` applies it);
* ``mxvision-manifest.json``: the model family, classes or pathologies, which outputs are
  unavailable and why, the preprocessing, the weights' provenance, an Xvision run's probability
  calibrator (``calibration``: ``train --calibrate``, applied by the handler after the softmax, as
  ``predict`` applies it; null when the run has none), the layer Grad-CAM is taken at
  (:mod:`mxvision.serve.cam`), the SHA-256 of both network files (checked when the server loads the
  archive) and the mxvision version;
* ``mxvision_handler.py``: two lines that hand each request to :mod:`mxvision.serve.handler`, so
  the server's Python must have mxvision installed (``pip install mxvision[serve]``).
"""
import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path

import mxnet as mx
import numpy as np

from mxvision.errors import MxvisionError
from mxvision.export import export_model
from mxvision.inference import DEFAULT_INT8_TOLERANCE, check_int8_arguments, int8_classifier, unavailable_outputs
from mxvision.models import zoo
from mxvision.models.xrv.common import DEFAULT_PATHOLOGIES, get_weights_spec
from mxvision.runtime import parse_ctx
from mxvision.serve.cam import find_cam_layer
from mxvision.utils import atomic_path

MANIFEST = "mxvision-manifest.json"
HANDLER_MODULE = "mxvision_handler"
SYMBOL, PARAMS = "model-symbol.json", "model-0000.params"
HANDLER_SOURCE = '''"""MXNet Model Server entry point of an mxvision archive (see mxvision.serve.handler)."""
from mxvision.serve.handler import handle  # noqa: F401
'''


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _xvision_network(run, work, dtype, ctx):
    paths = export_model(run, work / "model", ctx=ctx, dtype=dtype)
    meta = json.loads(Path(paths["meta"]).read_text(encoding="utf-8"))
    if dtype == "int8" and meta["precision"] != "int8":
        raise MxvisionError(str(run), "its features were extracted in %s, so it serves in %s; extract "
                                      "with --dtype int8 and train on those features to serve INT8"
                            % (meta["features_precision"], meta["precision"]))
    info = {"family": "xvision", "classes": meta["classes"], "output": meta["output"],
            "preprocessing": meta["preprocessing"], "precision": meta["precision"],
            "weights": {"backbone": meta["backbone_weights"], "run": meta["run_dir"]},
            "calibration": meta.get("calibration"),
            "random_weights": "RANDOM" in meta["backbone_weights"].upper()}
    return paths["symbol"], paths["params"], info


def _xrv_network(model, weights, work, dtype, ctx, root, calibration=None, int8_tolerance=DEFAULT_INT8_TOLERANCE):
    if dtype not in (None, "float32", "int8"):
        raise MxvisionError("--dtype %s" % dtype, "the torchxrayvision ports are served in float32 or int8")
    spec = get_weights_spec(model)
    if dtype == "int8":
        check_int8_arguments(ctx, calibration, int8_tolerance)
    net = zoo.get_model(model, weights=weights, calibrated=True, ctx=ctx, root=root)
    reasons = unavailable_outputs(spec, calibrated=True)
    check = None
    if dtype == "int8":  # classify's INT8 network, with its check: refused beyond the tolerance
        _, check = int8_classifier(net, model, ctx, calibration, int8_tolerance, reasons, keep=work / "int8")
        files = check.pop("files")
        os.replace(files["symbol"], work / SYMBOL)  # the quantized graph, also ending at the logits
        os.replace(files["params"], work / PARAMS)
    else:
        net.hybridize()
        net(mx.nd.zeros((1, 1, spec.resolution, spec.resolution), ctx=ctx))
        net.export(str(work / "model"), epoch=0)  # the symbolic graph ends at the logits
    info = {"family": "xrv", "model": model, "pathologies": list(DEFAULT_PATHOLOGIES),
            "output": "calibrated scores (torchxrayvision's op_norm of the sigmoid), in the order "
                      "of pathologies; null where unavailable",
            "preprocessing": {"name": spec.preset, "resolution": spec.resolution},
            "op_threshs": [float(v) for v in net.op_threshs] if net.op_threshs is not None else None,
            "unavailable": {DEFAULT_PATHOLOGIES[k]: why for k, why in sorted(reasons.items())},
            "precision": dtype or "float32", "weights": dict(net.weights_info),
            "random_weights": net.weights_info.get("spec") == "none", **({"int8": check} if check else {})}
    return str(work / SYMBOL), str(work / PARAMS), info


def export_archive(out, run=None, model=None, weights=None, dtype=None, name=None, ctx=None,
                   root=None, calibration=None, int8_tolerance=DEFAULT_INT8_TOLERANCE):
    """Write the model archive ``out`` (``.mar``) for a trained Xvision ``run`` or a
    torchxrayvision port ``model`` (``weights``: a path, or None for the registry's default).
    A port with ``dtype="int8"`` packs ``classify --dtype int8``'s network, calibrated and checked
    on the ``calibration`` films (:func:`mxvision.inference.int8_classifier`; refused when its
    scores move more than ``int8_tolerance``); its manifest's ``int8`` records the check, and a
    Grad-CAM request gets an error in place of the map (the quantized graph has no gradient).
    Returns ``{"archive", "name", "manifest"}``. The file appears whole or not at all."""
    if (run is None) == (model is None):
        raise MxvisionError("export", "give a trained run (--run) or a torchxrayvision model (--model)")
    if calibration is not None and (run is not None or dtype != "int8"):
        raise MxvisionError("--calibration", "is for --model with --dtype int8 (a run's INT8 network was "
                                             "calibrated when its features were extracted)")
    out = Path(out)
    if out.suffix != ".mar":
        raise MxvisionError(str(out), "a model archive's name ends in .mar (MXNet Model Server "
                                      "loads NAME.mar as the model NAME)")
    name = name or out.stem
    ctx = parse_ctx(ctx)
    with tempfile.TemporaryDirectory(prefix="mxvision-mar-") as tmp:
        work = Path(tmp)
        if run is not None:
            symbol, params, info = _xvision_network(run, work, dtype, ctx)
        else:
            symbol, params, info = _xrv_network(model, weights, work, dtype, ctx, root, calibration, int8_tolerance)
        from mxvision import __version__

        with open(symbol, encoding="utf-8") as f:
            cam_layer = None if info.get("int8") else find_cam_layer(json.load(f))
        manifest = {"format": 1, "name": name, "mxvision": __version__, "mxnet": mx.__version__,
                    **info, "input": {"name": "data"}, "cam_layer": cam_layer,
                    "files": {SYMBOL: sha256_file(symbol), PARAMS: sha256_file(params)}}
        # "python" runs the workers on the server's own interpreter (the one with mxvision); "python3"
        # would run whatever `python3` is first on PATH
        mms_manifest = {"runtime": "python",
                        "model": {"modelName": name, "handler": HANDLER_MODULE + ":handle"},
                        "modelServerVersion": "1.0", "implementationVersion": "1.0",
                        "specificationVersion": "1.0"}
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp_out:
            with zipfile.ZipFile(tmp_out, "w", zipfile.ZIP_DEFLATED) as mar:
                mar.write(symbol, SYMBOL)
                mar.write(params, PARAMS)
                mar.writestr(MANIFEST, json.dumps(manifest, indent=2, default=_json_default))
                mar.writestr(HANDLER_MODULE + ".py", HANDLER_SOURCE)
                mar.writestr("MAR-INF/MANIFEST.json", json.dumps(mms_manifest, indent=2))
    return {"archive": str(out), "name": name, "manifest": manifest}


def read_manifest(archive) -> dict:
    """The mxvision manifest of a ``.mar`` (MxvisionError when it is not an mxvision archive)."""
    try:
        with zipfile.ZipFile(archive) as mar:
            return json.loads(mar.read(MANIFEST).decode("utf-8"))
    except (OSError, KeyError, zipfile.BadZipFile, ValueError) as err:
        raise MxvisionError(str(archive), "not an mxvision model archive (%s)"
                            % (type(err).__name__ if not str(err) else str(err).splitlines()[0])) from None


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(type(value).__name__)


__all__ = ["export_archive", "read_manifest", "MANIFEST", "SYMBOL", "PARAMS", "sha256_file"]
