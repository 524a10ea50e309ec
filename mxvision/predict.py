"""Class probabilities for new images from a trained run (backbone + head, same preprocessing)."""
import logging
from pathlib import Path

import mxnet as mx
import numpy as np

from mxvision.data import transforms
from mxvision.runtime import parse_ctx
from mxvision.errors import BadImage, BadRun
from mxvision.features.quantize import load_extractor
from mxvision.models.classifier import XvisionClassifier
from mxvision.train.loop import load_head
from mxvision.utils import file_digest

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".bmp", ".tif", ".tiff"}


def _backbone_file(features_info):
    """The exact backbone weights the run's features came from, checked against their sha1."""
    weights = features_info["weights"]
    path = Path(weights["file"])
    if not path.is_absolute():  # random weights are kept inside the feature store
        path = Path(features_info["features_dir"]) / path
    if not path.is_file():
        raise BadRun(path, "backbone weights of this run are missing (needed to rebuild the model)")
    if file_digest(path, "sha1") != weights["sha1"]:
        raise BadRun(path, "backbone weights changed since the features were extracted")
    return path


def load_classifier(run_dir, ctx=None, softmax=True, dtype=None):
    """Rebuild the full network of a run: the backbone its features came from + its best head.

    The backbone runs in the precision the features were extracted with (bfloat16/INT8 features:
    the converted network kept in the feature store; pooled features: plus the pooling), so
    predictions match the features the head was trained on. ``dtype="float32"`` forces the
    float32 backbone (portable, e.g. for a GPU or for export without oneDNN).
    """
    ctx = parse_ctx(ctx)
    head, config = load_head(run_dir, ctx=ctx)
    features_info = dict(config["features"])
    if dtype == "float32":
        features_info["dtype"] = "float32"
    elif dtype not in (None, features_info.get("dtype", "float32")):
        raise BadRun(run_dir, f"its features were extracted in {features_info.get('dtype', 'float32')}; "
                              f"a {dtype} backbone would not match them (float32 is the only alternative)")
    backbone, used = load_extractor(features_info, ctx=ctx,
                                    fp32_weights_file=_backbone_file(features_info))
    net = XvisionClassifier(backbone, head, softmax=softmax)
    net.precision = used  # the backbone precision actually used (export records it)
    return net, config


def expand_images(inputs):
    """Image files from a mix of file and folder arguments (folders: their image files, sorted)."""
    paths = []
    for item in map(Path, inputs):
        try:
            if item.is_dir():
                paths.extend(sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
                continue
        except OSError:  # e.g. a name too long to stat: reading it reports the error per file
            pass
        paths.append(item)
    return paths


def predict(run_dir, images, ctx=None, batch_size=8, strict=False):
    """Probabilities per class for each image (files or folders).

    Returns one dict per image: ``{"path", "probabilities": {class: p}, "predicted"}``, or
    ``{"path", "error"}`` for an unreadable image (``strict=True`` raises instead).
    """
    ctx = parse_ctx(ctx)
    net, config = load_classifier(run_dir, ctx=ctx)
    classes = config["features"]["classes"]
    preset = transforms.get_preset(config["features"]["preprocessing"]["name"])
    net.hybridize()
    results, batch = [], []

    def flush():
        if batch:
            probs = net(mx.nd.array(np.stack([img for _, img in batch]), ctx=ctx)).asnumpy()
            for (path, _), p in zip(batch, probs):
                results.append({"path": str(path), "probabilities": dict(zip(classes, map(float, p))),
                                "predicted": classes[int(p.argmax())]})
            batch.clear()

    for path in expand_images(images):
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
