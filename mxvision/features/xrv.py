"""Features of a torchxrayvision model for transfer learning (``mxvision xrv features``).

The features are what the model's ``"features"`` backbone cut gives: for the autoencoder
``resnet_ae-101-elastic`` its (512, 3, 3) latent (torchxrayvision's ``encode``/``features``), for
the classifiers their pooled feature vector. Two outputs, for the two ways films come:

* an index (``--index CSV`` or a folder with one sub-folder per class) -> a **feature store**,
  exactly what ``mxvision extract --backbone MODEL --cut features`` writes (this is that code,
  with the model's own weights resolved first): ``mxvision train --features STORE`` trains the
  Xvision head on it (the head flattens each map), ``evaluate``/``export`` follow as for any store;
* image files or folders without labels -> one ``.npz``: ``paths`` (N,) strings, ``features``
  (N, D) float32 -- each film's features flattened in C order -- and ``feature_shape``; plain
  arrays, so ``numpy.load`` reads it without pickle. Unreadable files are reported, not stored.

Preprocessing: the store's films go through the pipeline's preset of the model (``xrv224``:
the model card's centre crop and [-1024, 1024], resized with OpenCV's ``INTER_AREA`` -- which is
torchxrayvision's ``XRayResizer(engine="cv2")``), as for every backbone, so ``predict`` and
``export`` of a head trained on it see the same input; the ``.npz``'s go through the model
card's own ``XRayResizer`` (scikit-image's), as ``classify`` does, so they are the features
torchxrayvision's ``model.features(img)`` gives. The two resizers differ by 1-5 of the 2048 grey
levels on average, up to ~170 at sharp edges (measured on a JSRT and the PadChest sample film).

Weights: the release file, downloaded, converted and verified once
(:func:`mxvision.models.xrv.weights.fetch_weights`), or a local ``.pt``/``.params`` (``weights``).
"""
import os

import mxnet as mx
import numpy as np
from tqdm import tqdm

from mxvision.data.folder import expand_images
from mxvision.data.xrv_transforms import load_xray, preprocess
from mxvision.errors import BadImage, MxvisionError, WeightsError
from mxvision.features.extract import extract_features
from mxvision.models import zoo
from mxvision.models.xrv import weights as xrv_weights
from mxvision.runtime import parse_ctx
from mxvision.utils import atomic_path

DEFAULT_MODEL = "resnet_ae-101-elastic"
CUT = "features"
XRV_FAMILIES = ("xrv", "xrv-other")


def check_features_model(model):
    """The registry entry of a torchxrayvision model with a ``features`` cut, else one line naming them."""
    try:
        config = zoo.get_model_config(model)
    except WeightsError:
        config = None
    if config is None or config.family not in XRV_FAMILIES or CUT not in config.cuts:
        known = [n for family in XRV_FAMILIES for n in zoo.list_models(family=family)
                 if CUT in zoo.get_model_config(n).cuts]
        raise MxvisionError("--model %s" % model, "not a torchxrayvision model with features; "
                            "known: %s (other networks: mxvision extract)" % ", ".join(sorted(known)))
    return config


def resolve_weights_file(model, weights=None, root=None, progress=True):
    """The file the model's features are computed with: ``weights`` (a local ``.pt``/``.params``)
    as given, or the verified conversion of its release file (downloaded on first use)."""
    check_features_model(model)
    if weights is not None:
        if not os.path.isfile(weights):
            raise WeightsError(weights, "no such weights file; give a torchxrayvision .pt or a converted .params")
        return os.path.abspath(weights)
    spec = xrv_weights.get_any_spec(model)
    if getattr(spec, "supplied_by_user", None):
        raise WeightsError(model, spec.supplied_by_user)
    return xrv_weights.fetch_weights(model, root=root, progress=progress)[0]


def extract_xrv_features(index, out, model=DEFAULT_MODEL, weights=None, root=None, progress=True, **options):
    """The feature store of ``index``'s films (an index CSV or a folder per class) in ``out``, from
    the model's ``features`` cut; ``options`` go to :func:`~mxvision.features.extract.extract_features`
    (``ctx``, ``batch_size``, ``strict``, ``overwrite``, ``pooled``...). Returns the FeatureStore."""
    path = resolve_weights_file(model, weights, root=root, progress=progress)
    return extract_features(index, out, backbone=model, cut=CUT, weights=path, progress=progress, **options)


def encode_images(images, model=DEFAULT_MODEL, weights=None, ctx=None, batch_size=16, strict=False,
                  root=None, progress=False):
    """Each film's features: ``{"path", "features"}`` (a flat float32 vector) or ``{"path", "error"}``
    (``strict=True`` raises BadImage instead); ``images``: files or folders. Returns
    ``(results, info)``, ``info`` saying which model, weights and feature shape."""
    config = check_features_model(model)
    paths = expand_images([images] if isinstance(images, (str, os.PathLike)) else images, require=True)
    ctx = parse_ctx(ctx)
    path = resolve_weights_file(model, weights, root=root, progress=progress)
    net = zoo.get_model(model, cut=CUT, weights_file=path, ctx=ctx)
    size = xrv_weights.get_any_spec(model).resolution
    results, batch, shape = [None] * len(paths), [], None

    def flush():
        nonlocal shape
        if batch:
            out = net(mx.nd.array(np.stack([img for _, img in batch]), ctx=ctx)).asnumpy()
            shape = out.shape[1:]
            for (i, _), row in zip(batch, out):
                results[i] = {"path": str(paths[i]), "features": row.reshape(-1).astype(np.float32)}
            batch.clear()

    for i, film in enumerate(tqdm(paths, desc="features", unit="img", disable=not progress or len(paths) < 2)):
        try:
            img = preprocess(load_xray(film), size)
        except BadImage as err:
            if strict:
                raise
            results[i] = {"path": str(film), "error": str(err)}
            continue
        batch.append((i, img))
        if len(batch) >= max(1, int(batch_size)):
            flush()
    flush()
    info = {"model": model, "cut": CUT, "preset": config.preset, "weights": net.weights_info["description"],
            "feature_shape": list(shape) if shape is not None else None}
    return results, info


def write_features_npz(results, info, out):
    """Write the readable films' features of :func:`encode_images` to ``out`` (``.npz``), atomically;
    returns its absolute path. Refuses, in one line, a folder, another suffix, or no readable film."""
    if not str(out).endswith(".npz"):
        raise MxvisionError(str(out), "name the .npz file to write (features of image files; an index "
                                      "gives a feature store folder instead)")
    if os.path.isdir(out):
        raise MxvisionError(str(out), "is a folder; give the name of the .npz file to write")
    ok = [r for r in results if "error" not in r]
    if not ok:
        raise MxvisionError(str(out), "no film could be read, so there are no features to write")
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would add .npz to the temporary name
            np.savez(f, paths=np.array([r["path"] for r in ok]), features=np.stack([r["features"] for r in ok]),
                     feature_shape=np.array(info["feature_shape"], dtype=np.int64), model=np.array(info["model"]),
                     weights=np.array(info["weights"]))
    return os.path.abspath(out)
