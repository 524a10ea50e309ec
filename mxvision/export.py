"""Exporting a trained run as one deployable symbol file pair (+ a small JSON of metadata).

``PREFIX-symbol.json`` + ``PREFIX-0000.params`` hold backbone + head + softmax, hybridized; they load
with ``gluon.SymbolBlock.imports(symbol, ["data"], params)`` or the Module API, without mxvision.
``PREFIX-meta.json`` says which classes the outputs are and how to preprocess an image, and, for a
run trained with ``--calibrate``, holds its calibrator (``calibration``): the network's softmax is
uncalibrated, the loader applies the calibrator to the positive column
(:func:`mxvision.train.calibrators.calibrate_probs`, NumPy only; :func:`load_exported_calibrator`),
as the served archive's handler does.
"""
import os
from pathlib import Path

import mxnet as mx
from mxnet import gluon

from mxvision.data import transforms
from mxvision.runtime import parse_ctx
from mxvision.train.calibrators import check_calibrator, describe, load_run_calibrator
from mxvision.train.loop import load_classifier
from mxvision.train.runs import load_run, read_run_json
from mxvision.utils import write_json


def export_model(run_dir, prefix, ctx=None, dtype=None):
    """Write ``PREFIX-symbol.json``, ``PREFIX-0000.params`` and ``PREFIX-meta.json``; return their paths.

    The backbone is exported in the precision its features were extracted with (an INT8 or
    bfloat16 run exports the converted graph, which runs only on MXNet CPU builds with oneDNN,
    such as the PyPI ``mxnet`` wheel); ``dtype="float32"`` exports the portable float32 graph
    instead, whose features differ slightly from the ones the head was trained on. A bfloat16
    run always exports float32 (MXNet cannot save its AMP graph); ``meta.json`` records both.
    """
    ctx = parse_ctx(ctx)
    if dtype is None and load_run(run_dir)[0]["features"].get("dtype") == "bfloat16":
        dtype = "float32"  # an exported AMP-bfloat16 graph reloads as float32 (MXNet 1.9.1): say so
    net, config = load_classifier(run_dir, ctx=ctx, dtype=dtype)
    calibrator = load_run_calibrator(run_dir)
    features = config["features"]
    preset = transforms.get_preset(features["preprocessing"]["name"])
    net.hybridize()
    input_shape = (1, preset.channels, preset.size, preset.size)
    net(mx.nd.zeros(input_shape, ctx=ctx))
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    # Export under a temporary prefix, then rename both files: never a half-written pair.
    tmp_prefix = prefix.parent / f".{prefix.name}.tmp{os.getpid()}"
    net.export(str(tmp_prefix), epoch=0)
    paths = {"symbol": Path(f"{prefix}-symbol.json"), "params": Path(f"{prefix}-0000.params"),
             "meta": Path(f"{prefix}-meta.json")}
    os.replace(f"{tmp_prefix}-symbol.json", paths["symbol"])
    os.replace(f"{tmp_prefix}-0000.params", paths["params"])
    write_json(paths["meta"], {
        "classes": features["classes"],
        "input_name": "data",
        "input_shape": list(input_shape),
        "output": "class probabilities (softmax), in the order of classes" + (
            f"; {describe(calibrator)}: apply calibration to the positive class (the last), the "
            "other is 1 minus it (mxvision.train.calibrators.calibrate_probs)" if calibrator else ""),
        "calibration": calibrator,
        "preprocessing": features["preprocessing"],
        "backbone": features["backbone"],
        "cut": features["cut"],
        "backbone_weights": features["weights"]["description"],
        "precision": net.precision,
        "features_precision": features.get("dtype", "float32"),
        "pooled": bool(features.get("pooled", False)),
        "run_dir": str(Path(run_dir).resolve()),
    })
    return {k: str(v) for k, v in paths.items()}


def load_exported_calibrator(prefix):
    """The calibrator ``PREFIX-meta.json`` carries (checked), or None for an uncalibrated export."""
    path = Path(f"{prefix}-meta.json")
    calibrator = read_run_json(path).get("calibration")
    if calibrator is None:
        return None
    return check_calibrator(calibrator, path)


def load_exported(prefix, ctx=None):
    """Load an exported pair as a SymbolBlock (what a deployment would do)."""
    ctx = parse_ctx(ctx)
    return gluon.SymbolBlock.imports(f"{prefix}-symbol.json", ["data"], f"{prefix}-0000.params",
                                     ctx=ctx)
