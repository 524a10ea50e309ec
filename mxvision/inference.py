"""Scoring new image files: ``predict`` with a trained Xvision run, ``classify`` with a
torchxrayvision port.

Both take files or folders (:func:`mxvision.data.folder.expand_images`), preprocess each image
exactly as the network was trained on it, score in batches, and report an unreadable file as
``{"path", "error"}`` beside the others' results (``strict=True`` raises instead).

The torchxrayvision model card, and its MXNet equivalent (preprocessing in
:mod:`mxvision.data.xrv_transforms`)::

    # PyTorch / torchxrayvision                         # MXNet / mxvision
    model = xrv.models.get_model(name)                  model = mxv.get_model(name)
    img = xrv.datasets.normalize(imread(p), 255)        img = normalize(imread(p), 255)
    img = img.mean(2)[None, ...]                        img = img.mean(2)[None, ...]
    img = XRayCenterCrop()(img)                         img = XRayCenterCrop()(img)
    img = XRayResizer(224)(img)                         img = XRayResizer(224)(img)
    preds = model(torch.from_numpy(img)[None])          preds = model(mx.nd.array(img[None]))
    dict(zip(default_pathologies, preds[0]))            dict(zip(DEFAULT_PATHOLOGIES, preds[0].asnumpy()))

or, in one call that reads the files and marks outputs the weights cannot give,
``classify(paths, model=name)``.
"""
import logging
from pathlib import Path

import mxnet as mx
import numpy as np

from mxvision.data import transforms
from mxvision.data.folder import expand_images
from mxvision.data.xrv_transforms import load_xray, preprocess
from mxvision.errors import BadImage, BadRun
from mxvision.models import zoo
from mxvision.models.xrv.common import DEFAULT_PATHOLOGIES, get_weights_spec
from mxvision.runtime import parse_ctx
from mxvision.train.calibrators import calibrate_probs, load_run_calibrator
from mxvision.train.calibrators import describe as describe_calibration
from mxvision.train.loop import load_classifier

__all__ = ["predict", "classify", "unavailable_outputs", "DEFAULT_MODEL"]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "densenet121-res224-all"


def predict(run_dir, images, ctx=None, batch_size=8, strict=False):
    """Probabilities per class for each image (files or folders).

    Returns one dict per image: ``{"path", "probabilities": {class: p}, "predicted",
    "calibration"}``, or ``{"path", "error"}`` for an unreadable image (``strict=True`` raises
    instead). A folder without images, or no input at all, raises BadIndex (``no images found in
    DIR``). A run trained with ``--calibrate`` gives calibrated probabilities (its calibrator
    applied after the softmax, :mod:`mxvision.train.calibrators`) and ``"calibration":
    "calibrated (platt)"``; otherwise ``"uncalibrated"``.
    """
    paths = expand_images([images] if isinstance(images, (str, Path)) else images, require=True)
    ctx = parse_ctx(ctx)
    net, config = load_classifier(run_dir, ctx=ctx)
    calibrator = load_run_calibrator(run_dir)
    classes = config["features"]["classes"]
    preset = transforms.get_preset(config["features"]["preprocessing"]["name"])
    net.hybridize()
    results, batch = [], []

    def flush():
        if batch:
            probs = net(mx.nd.array(np.stack([img for _, img in batch]), ctx=ctx)).asnumpy()
            if not np.isfinite(probs).all():  # finite parameters can still overflow
                raise BadRun(Path(run_dir) / "best.params", "gives non-finite probabilities (NaN or "
                                                            "infinity); its parameters are corrupt")
            probs = calibrate_probs(calibrator, probs)
            for (path, _), p in zip(batch, probs):
                results.append({"path": str(path), "probabilities": dict(zip(classes, map(float, p))),
                                "predicted": classes[int(p.argmax())],
                                "calibration": describe_calibration(calibrator)})
            batch.clear()

    for path in paths:
        try:
            batch.append((path, transforms.load_image(path, preset)))
        except BadImage as err:
            if strict:
                raise
            flush()
            results.append({"path": str(path), "error": str(err)})
        if len(batch) >= batch_size:
            flush()
    flush()
    return results


def unavailable_outputs(spec, calibrated):
    """Per-output reason why a score cannot be given (None when it can)."""
    reasons = {i: "untrained" for i in spec.untrained}
    if calibrated:
        reasons.update({i: "no operating point (calibrated output is the constant 0.5)"
                        for i in spec.no_threshold})
    return reasons


def classify(images, model=DEFAULT_MODEL, weights=None, calibrated=True, ctx=None, batch_size=1,
             strict=False, root=None, progress=False):
    """Score chest X-ray files (or folders of them) for the 18 pathologies; one dict per image.

    Each result has ``path``, ``model``, ``weights`` (which weights were used), ``calibrated``,
    ``outputs`` (the 18 raw model outputs in :data:`DEFAULT_PATHOLOGIES` order, exactly what
    torchxrayvision's ``model(img)`` returns), ``scores`` (pathology -> value, or None where the
    weights cannot give one: ``untrained`` outputs, and with calibration the trained outputs that
    have no operating point) and ``unavailable`` (pathology -> reason). Without calibration the
    outputs are sigmoid probabilities. An unreadable file gives ``{"path", "error"}`` (or raises
    BadImage with ``strict=True``); a folder without images, or no input, raises BadIndex.
    """
    spec = get_weights_spec(model)
    paths = expand_images([images] if isinstance(images, (str, Path)) else images, require=True)
    ctx = parse_ctx(ctx)
    net = zoo.get_model(model, weights=weights, calibrated=calibrated, apply_sigmoid=not calibrated,
                        ctx=ctx, root=root, progress=progress)
    net.hybridize(static_alloc=True, static_shape=True)
    reasons = unavailable_outputs(spec, calibrated)
    results = [None] * len(paths)
    batch = []

    def flush():
        if not batch:
            return
        x = mx.nd.array(np.stack([img for _, img in batch]), ctx=ctx)
        out = net(x).asnumpy()
        for (i, _), row in zip(batch, out):
            scores = {name: (None if k in reasons else float(row[k])) for k, name in enumerate(DEFAULT_PATHOLOGIES)}
            results[i] = {
                "path": str(paths[i]), "model": model, "weights": net.weights_info["description"],
                "calibrated": bool(calibrated and net.op_threshs is not None),
                "outputs": [float(v) for v in row], "scores": scores,
                "unavailable": {DEFAULT_PATHOLOGIES[k]: why for k, why in sorted(reasons.items())},
            }
        batch.clear()

    for i, path in enumerate(paths):
        try:
            img = preprocess(load_xray(path), spec.resolution)
        except BadImage as err:
            if strict:
                raise
            results[i] = {"path": str(path), "error": str(err)}
            continue
        batch.append((i, img))
        if len(batch) >= max(1, int(batch_size)):
            flush()
    flush()
    return results
