"""Heatmaps of what a model's score depends on: Grad-CAM and input-gradient saliency.

Both need the network split in two, ``features(x) -> A`` (a spatial map) and ``head(A) ->
logits``, differentiated as the network computes in inference (BatchNorm with its running
statistics, no Dropout; see :func:`frozen_train_mode` for how, on oneDNN, that is done):

* **Grad-CAM** (Selvaraju et al. 2017): ``relu(sum_k mean_ij(d y_c / d A_kij) * A_k)``, the
  feature map weighted by how much each channel raises the target logit ``y_c``. For the Xvision
  classifier ``A`` is the backbone output (``stage4_unit2_relu1``, 7x7 at 224), so the map is
  coarse: one cell covers 73 px of a 512 px film.
* **Input-gradient saliency**, as torchxrayvision's notebooks draw it: ``(d y_c / d x)^2`` summed
  over channels and Gaussian-blurred (sigma 5 px at 224).

Supported networks: :class:`~mxvision.models.classifier.XvisionClassifier` (backbone, head), the
torchxrayvision ports (ResNet-50: ``layer4`` map, then pooling + ``fc``; DenseNet-121: the ReLU'd
``features`` map, then pooling + ``classifier``), anything with a ``cam_split()`` method returning
``(features_fn, head_fn)``, or such a pair given directly.

Heatmaps are returned in the *original image's* pixel grid: every preset crops the largest centred
square, so the map is resized to that square and placed back (zero outside it). That is what a
pointing game against nodule coordinates in the file's own grid needs.
"""
import contextlib
import functools
import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import cv2
import mxnet as mx
import numpy as np
from mxnet import autograd
from mxnet.gluon import Block, nn

from mxvision.data import transforms
from mxvision.runtime import parse_ctx
from mxvision.data.folder import expand_images
from mxvision.errors import BadImage, MxvisionError
from mxvision.io.images import read_image
from mxvision.models.classifier import XvisionClassifier
from mxvision.utils import atomic_path

log = logging.getLogger(__name__)

METHODS = ("gradcam", "saliency")
# Gradients run in *training* mode with BatchNorm frozen (frozen_train_mode), because (MXNet 1.9.1):
# * backward() after an inference-mode forward differentiates BatchNorm as if it had used batch
#   statistics (apache/mxnet#9580; d sum(BN(x)) / dx came out ~2800 instead of 1);
# * on oneDNN (the PyPI CPU wheel) an inference-mode max-pooling forward keeps no arg-max
#   workspace and its backward reads stale memory (cf. apache/mxnet#10994): a random ResNet-18's
#   input gradient of -0.256 (finite differences) came out 0.009, varying between runs.
TRAIN_INFERENCE_RTOL = 1e-3  # train-mode vs inference logits (oneDNN may pick other kernels)

SALIENCY_SIGMA_224 = 5.0


def _pool_then(dense):
    def head(a):
        return dense(mx.nd.flatten(mx.nd.Pooling(a, kernel=(1, 1), global_pool=True, pool_type="avg")))
    return head


def cam_split(net):
    """``(features_fn, head_fn)`` of a supported network (see the module docstring)."""
    if isinstance(net, (tuple, list)) and len(net) == 2:
        return tuple(net)
    if hasattr(net, "cam_split"):
        return net.cam_split()
    if isinstance(net, XvisionClassifier):
        return net.backbone, net.head
    from mxvision.models.xrv import densenet as xrv_densenet
    from mxvision.models.xrv import resnet as xrv_resnet
    if isinstance(net, xrv_resnet.XRVResNet) and net.fc is not None:
        return (lambda x: net._trunk(mx.nd, x)), _pool_then(net.fc)
    if isinstance(net, xrv_densenet.XRVDenseNet) and net.classifier is not None:
        return (lambda x: mx.nd.relu(net.features(x))), _pool_then(net.classifier)
    raise MxvisionError(type(net).__name__, "cannot split this network for Grad-CAM; give "
                        "(features_fn, head_fn) or add a cam_split() method")


def _targets(logits, target):
    n = logits.shape[0]
    if target is None:
        return logits.argmax(axis=1).astype("int32")
    return mx.nd.full((n,), int(target), ctx=logits.context, dtype="int32")


def _unit(m):
    """``m / max(m)`` as float32; all zero when the map has no positive or finite peak (a
    gradient that overflowed, e.g. in an untrained deep net, gives nothing to point at)."""
    m = np.asarray(m, np.float64)
    if not np.isfinite(m).all():
        log.warning("non-finite gradients; returning an empty heatmap")
        return np.zeros(m.shape, np.float32)
    peak = m.max() if m.size else 0.0
    return (m / peak).astype(np.float32) if peak > 0 else np.zeros(m.shape, np.float32)


def _cell(cell):
    try:
        return cell.cell_contents
    except ValueError:  # empty: a variable not assigned yet
        return None


def _blocks_in(fns, _seen=None):
    """The Gluon blocks behind callables: blocks themselves, bound methods' owners, and what
    functions (lambdas, ``functools.partial``) hold in their closures, searched recursively."""
    seen = set() if _seen is None else _seen
    found = []
    for fn in fns:
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        if isinstance(fn, Block):
            found.append(fn)
        elif isinstance(fn, (tuple, list)):
            found += _blocks_in(fn, seen)
        elif isinstance(fn, functools.partial):
            found += _blocks_in([fn.func, *fn.args, *fn.keywords.values()], seen)
        elif isinstance(getattr(fn, "__self__", None), Block):
            found.append(fn.__self__)
        elif getattr(fn, "__closure__", None):
            found += _blocks_in([_cell(c) for c in fn.__closure__], seen)
    return found


@contextlib.contextmanager
def frozen_train_mode(*fns):
    """Make training mode compute what inference computes, for the blocks behind ``fns``.

    Inside, every BatchNorm of those blocks runs with ``use_global_stats=True`` (its running
    statistics, which then are neither used from the batch nor updated) and every Dropout is
    off, so ``autograd.record(train_mode=True)`` gives inference outputs while oneDNN keeps the
    max-pooling workspace its backward needs (see the note above). Hybridized graphs are rebuilt
    on entry and exit. The blocks are changed in place meanwhile: do not run them from another
    thread. Nesting is cheap (nothing left to change, nothing rebuilt)."""
    blocks = _blocks_in(fns)
    norms, drops = [], []

    def collect(block):
        kwargs = getattr(block, "_kwargs", None)
        if isinstance(kwargs, dict) and kwargs.get("use_global_stats") is False:
            norms.append(block)
        if isinstance(block, nn.Dropout) and block._rate > 0:
            drops.append((block, block._rate))

    for block in blocks:
        block.apply(collect)

    def rebuild():
        for block in blocks:
            block.apply(lambda b: b._clear_cached_op() if isinstance(b, nn.HybridBlock) else None)

    for block in norms:
        block._kwargs["use_global_stats"] = True
    for block, _ in drops:
        block._rate = 0.0
    if norms or drops:
        rebuild()
    try:
        yield
    finally:
        for block in norms:
            block._kwargs["use_global_stats"] = False
        for block, rate in drops:
            block._rate = rate
        if norms or drops:
            rebuild()


def _check_as_inference(recorded, reference, fns):
    """Refuse a gradient whose forward did not compute the inference logits: a BatchNorm or
    Dropout :func:`frozen_train_mode` could not reach (e.g. hidden in a SymbolBlock's graph)."""
    got, want = recorded.asnumpy(), reference.asnumpy()
    finite = np.isfinite(want)  # an overflowing (untrained) net: same non-finite logits both ways
    diff = float(np.abs(got[finite] - want[finite]).max(initial=0.0))  # inf - inf warns
    scale = max(1.0, float(np.abs(want[finite]).max(initial=0.0)))
    if (np.isfinite(got) != finite).any() or diff > TRAIN_INFERENCE_RTOL * scale:
        raise MxvisionError(", ".join(type(fn).__name__ for fn in fns),
                            f"computes other logits in training mode than in inference (max "
                            f"difference {diff:.3g}): a BatchNorm or Dropout that mxvision.audit.explain "
                            "cannot reach; give Gluon blocks (or functions closing over them) as "
                            "(features, head)")


def grad_cam(features, head, x, target=None):
    """Grad-CAM maps ``(N, h, w)`` in [0, 1] at the feature map's resolution, the target logits
    ``(N,)`` and target indices ``(N,)``. ``target`` is a class/output index (default: each
    image's top class)."""
    a = features(x).detach()  # outside autograd: the backbone runs as in inference
    reference = head(a)
    a.attach_grad()
    with frozen_train_mode(head):
        with autograd.record(train_mode=True):  # see the note above METHODS
            logits = head(a)
            chosen = _targets(logits, target)
            picked = mx.nd.pick(logits, chosen, axis=1)
        picked.backward(mx.nd.ones_like(picked), train_mode=True)
    _check_as_inference(logits, reference, (head,))
    weights = a.grad.mean(axis=(2, 3), keepdims=True)
    cam = mx.nd.relu((weights * a).sum(axis=1)).asnumpy()
    return np.stack([_unit(c) for c in cam]), picked.asnumpy(), chosen.asnumpy().astype(int)


def input_gradient(features, head, x, target=None):
    """``d y_c / d x`` of the target logit (``(N, C, H, W)`` NDArray), the target logits ``(N,)``
    and target indices ``(N,)``, as the network computes in inference (see the note above
    METHODS; checked against an inference forward)."""
    reference = head(features(x))
    x = x.copy()
    x.attach_grad()
    with frozen_train_mode(features, head):
        with autograd.record(train_mode=True):
            logits = head(features(x))
            chosen = _targets(logits, target)
            picked = mx.nd.pick(logits, chosen, axis=1)
        picked.backward(mx.nd.ones_like(picked), train_mode=True)
    _check_as_inference(logits, reference, (features, head))
    return x.grad, picked.asnumpy(), chosen.asnumpy().astype(int)


def input_saliency(features, head, x, target=None, sigma=None):
    """Squared input gradients of the target logit, summed over channels and blurred (sigma 5 px
    at 224, scaled with the input size): ``(N, H, W)`` in [0, 1], the target logits and indices."""
    grad, picked, chosen = input_gradient(features, head, x, target)
    sal = (grad.asnumpy().astype(np.float64) ** 2).sum(axis=1)  # float64: no overflow
    sigma = SALIENCY_SIGMA_224 * x.shape[-1] / 224.0 if sigma is None else sigma
    out = np.stack([cv2.GaussianBlur(_unit(s).astype(np.float32), (0, 0), sigma) for s in sal])
    return np.stack([_unit(s) for s in out]), picked, chosen


def to_image_grid(heat, image_shape):
    """Map a heatmap over the preprocessed square back to the original ``(H, W)``: resized to the
    centred square every preset crops (bilinear) and zero outside it."""
    h, w = image_shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    out = np.zeros((h, w), np.float32)
    out[top:top + side, left:left + side] = cv2.resize(np.asarray(heat, np.float32), (side, side),
                                                        interpolation=cv2.INTER_LINEAR)
    return np.clip(out, 0.0, 1.0)


def peak_of(heat):
    """(x, y) pixel of the heatmap's maximum, or None for an all-zero map (nothing to point at)."""
    if not np.any(heat > 0):
        return None
    y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return int(x), int(y)


def overlay(image, heat, alpha=0.45, colormap=cv2.COLORMAP_JET):
    """BGR uint8 picture: the grey image with the heatmap's colours blended in where it is hot."""
    grey = np.clip(np.round(np.asarray(image, np.float32) * 255), 0, 255).astype(np.uint8)
    colour = cv2.applyColorMap(np.round(np.clip(heat, 0, 1) * 255).astype(np.uint8), colormap)
    weight = (alpha * np.clip(heat, 0, 1))[..., None]
    out = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR).astype(np.float32) * (1 - weight) + colour * weight
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def write_overlay(path, image, heat, alpha=0.45, marks=()):
    """Write :func:`overlay` as a PNG atomically; ``marks`` are ``(x, y, radius, (b, g, r))``
    circles (e.g. the heatmap peak and a known nodule)."""
    pic = overlay(image, heat, alpha)
    for x, y, r, colour in marks:
        cv2.circle(pic, (int(round(x)), int(round(y))), max(2, int(round(r))), colour, 2, cv2.LINE_AA)
    ok, buf = cv2.imencode(".png", pic)
    if not ok:
        raise MxvisionError(path, "OpenCV could not encode the overlay")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(buf.tobytes())
    return os.fspath(path)


@dataclass
class Explainer:
    """A network ready to explain files: its split, how to prepare a file, and its output names."""

    features: Callable
    head: Callable
    prepare: Callable  # 2-D [0, 1] image -> (C, S, S) float32 input
    classes: Sequence[str]
    ctx: mx.Context
    default_target: Optional[int] = None
    description: str = ""

    def target_index(self, target=None):
        if target is None:
            return self.default_target
        if isinstance(target, int) or str(target).isdigit():
            k = int(target)
            if 0 <= k < len(self.classes):
                return k
        elif target in self.classes:
            return list(self.classes).index(target)
        raise MxvisionError(f"--target {target}", f"not an output; choose one of {', '.join(self.classes)}")

    def heatmaps(self, images, method="gradcam", target=None, batch_size=8):
        """Heatmaps in each image's own grid for 2-D [0, 1] ``images``; returns ``(maps,
        target indices, target logits)``."""
        if method not in METHODS:
            raise MxvisionError(f"--method {method}", f"unknown; choose {' or '.join(METHODS)}")
        k = self.target_index(target)
        fn = grad_cam if method == "gradcam" else input_saliency
        maps, targets, scores = [], [], []
        with frozen_train_mode(self.features, self.head):  # once, not per batch
            for start in range(0, len(images), batch_size):
                chunk = images[start:start + batch_size]
                x = mx.nd.array(np.stack([self.prepare(img) for img in chunk]), ctx=self.ctx)
                heat, logit, chosen = fn(self.features, self.head, x, k)
                maps.extend(to_image_grid(h, img.shape) for h, img in zip(heat, chunk))
                targets.extend(int(c) for c in chosen)
                scores.extend(float(s) for s in logit)
        return maps, targets, scores


def explainer_from_run(run_dir, ctx=None):
    """An :class:`Explainer` for a trained (or fine-tuned) Xvision run; target default: the
    positive class (``nodule``) of a two-class run, else each image's top class."""
    from mxvision.train.loop import load_classifier

    ctx = parse_ctx(ctx)
    net, config = load_classifier(run_dir, ctx=ctx, softmax=False)
    preset = transforms.get_preset(config["features"]["preprocessing"])
    classes = list(config["features"]["classes"])
    features, head = cam_split(net)
    return Explainer(features, head, lambda img: transforms.preprocess(img, preset), classes, ctx,
                     default_target=1 if len(classes) == 2 else None,
                     description=f"{run_dir} ({config['features']['weights']['description']})")


def explainer_from_xrv(name, weights=None, ctx=None):
    """An :class:`Explainer` for a torchxrayvision model (18 outputs; target default ``Nodule``).
    ``weights``: None (published, cached), ``"none"`` (random) or a local file."""
    from mxvision.models import zoo
    from mxvision.models.xrv.common import DEFAULT_PATHOLOGIES, get_weights_spec

    ctx = parse_ctx(ctx)
    spec = get_weights_spec(name)
    net = zoo.get_model(name, weights=weights, ctx=ctx, progress=False)
    features, head = cam_split(net)
    preset = transforms.get_preset(spec.preset)
    return Explainer(features, head, lambda img: transforms.preprocess(img, preset),
                     list(DEFAULT_PATHOLOGIES), ctx,
                     default_target=list(DEFAULT_PATHOLOGIES).index("Nodule"),
                     description=net.weights_info["description"])


def explain_files(explainer, paths, out_dir, method="gradcam", target=None, alpha=0.45, strict=True):
    """Write ``<out_dir>/<stem>_<method>.png`` overlays for image files (or folders of them), with
    ``-2``, ``-3``... added when that name is already taken in this call or is one of the input
    images (two ``img.png`` from different folders; an input ``x_gradcam.png`` beside ``x.png``); one
    dict per file with ``path, overlay, target, logit, peak`` (peak = (x, y) of the map's maximum
    in the file's grid, None if the map is all zero). With ``strict=False`` an unreadable file gives
    ``{"path", "error"}`` and the others go on, as in ``predict``; a folder without images, or no
    path at all, raises BadIndex (``no images found in DIR``)."""
    results = []
    paths = list(expand_images(paths, require=True))
    taken = {os.path.abspath(os.fspath(p)) for p in paths}  # never write over an input image
    for path in paths:
        try:
            img = read_image(path)
        except BadImage as err:
            if strict:
                raise
            results.append({"path": os.fspath(path), "error": str(err)})
            continue
        (heat,), (k,), (score,) = explainer.heatmaps([img], method, target)
        if not np.isfinite(score):  # finite weights can still overflow: no score, no heatmap
            err = MxvisionError(path, f"the model gives a non-finite {explainer.classes[k]} score "
                                      f"({score}) on this image, so no heatmap; its weights "
                                      f"({explainer.description}) overflow")
            if strict:
                raise err
            results.append({"path": os.fspath(path), "error": str(err)})
            continue
        peak = peak_of(heat)
        marks = [(peak[0], peak[1], max(4, min(img.shape) / 64), (255, 255, 255))] if peak else []
        stem = os.path.splitext(os.path.basename(os.fspath(path)))[0]
        out, n = os.path.join(out_dir, f"{stem}_{method}.png"), 1
        while os.path.abspath(out) in taken:  # a/img.png and b/img.png: img_gradcam-2.png
            n += 1
            out = os.path.join(out_dir, f"{stem}_{method}-{n}.png")
        taken.add(os.path.abspath(out))
        out = write_overlay(out, img, heat, alpha, marks)
        results.append({"path": os.fspath(path), "overlay": out, "method": method,
                        "target": explainer.classes[k], "logit": score, "peak": peak})
    return results
