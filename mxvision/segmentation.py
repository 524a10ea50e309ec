"""Anatomical segmentation of chest films: torchxrayvision's ChestX-Det PSPNet, as masks a user can open.

The model (:mod:`mxvision.models.xrv.pspnet`, ``chestx_det-pspnet``) gives 14 logit maps at 512x512
for the centred square of the film (torchxrayvision's model card crops to it: ``XRayCenterCrop``,
``XRayResizer(512)``). A structure's mask is ``sigmoid(logit) > threshold``, 0.5 by default, as
torchxrayvision's segmentation notebooks take it.

Masks are given at the **film's own size**, so that they lie on the film a user opens (and on
the lesion-insertion films, :func:`lung_mask_provider`): each probability map is resized
bilinearly from 512 to the side of the centred square, thresholded there, and placed in the
square; pixels outside it (the margins of a non-square film, which the model never sees) are
outside every mask. Area fractions are of that square: ``mask pixels / side**2``.

:func:`write_segmentations` writes, for each film, one folder ``OUT/<stem>/`` with a uint8 PNG
(0 or 255) per structure named after it (``Left_Lung.png``), ``overlay.png`` (the film in grey
with every mask tinted in its colour, outlined, and a legend), and for all films
``OUT/segmentation.json`` (model, weights, threshold, each structure's file and colour, each film's
area fractions) and ``OUT/areas.csv`` (one row per film, one column per structure).
"""
import csv
import os
from pathlib import Path

import cv2
import mxnet as mx
import numpy as np
from scipy.special import expit

from mxvision.data.folder import expand_images
from mxvision.data.synth import write_png
from mxvision.data.xrv_transforms import load_xray, preprocess, xray_range
from mxvision.errors import BadImage, MxvisionError, WeightsError
from mxvision.models import zoo
from mxvision.models.xrv.pspnet import PSPNet
from mxvision.runtime import parse_ctx
from mxvision.utils import atomic_path, write_json

__all__ = ["DEFAULT_SEGMENTER", "DEFAULT_THRESHOLD", "LUNGS", "segmenters", "load_segmenter", "segment",
           "iter_segment", "write_segmentations", "lung_mask_provider", "overlay", "structure_file"]

DEFAULT_SEGMENTER = "chestx_det-pspnet"
DEFAULT_THRESHOLD = 0.5
LUNGS = ("Left Lung", "Right Lung")
#: One colour per structure, in the model's target order (matplotlib's tab20, the grey swapped
#: for olive so that no structure is grey on a grey film); cycled for a model with more targets.
PALETTE = ("#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a", "#d62728", "#ff9896",
           "#9467bd", "#c5b0d5", "#8c564b", "#e377c2", "#bcbd22", "#17becf")
OVERLAY_ALPHA = 0.4


def segmenters():
    """Names of the registered segmentation models."""
    return [n for n in zoo.list_models(family="xrv-other") if _is_segmenter(n)]


def _is_segmenter(name):
    network = zoo.get_model_config(name).network
    return isinstance(network, type) and issubclass(network, PSPNet)


def load_segmenter(model=DEFAULT_SEGMENTER, weights=None, ctx=None, root=None, progress=False):
    """The segmentation network ``model`` with ``weights``: None (torchxrayvision's published
    weights: downloaded, converted and cached once), ``"none"`` (random) or a ``.pt``/``.params``."""
    if model not in segmenters():
        raise WeightsError(model, "not a segmentation model; known: %s" % ", ".join(segmenters()))
    return zoo.get_model(model, weights=weights, ctx=parse_ctx(ctx), root=root, progress=progress)


def check_threshold(threshold):
    """The threshold as a float, or MxvisionError: a mask needs a probability strictly inside (0, 1)."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 < value < 1.0:
        raise MxvisionError("threshold %r" % (threshold,), "must be a number above 0 and below 1")
    return value


def centre_square(shape):
    """``(top, left, side)`` of the square torchxrayvision's ``XRayCenterCrop`` keeps of a (H, W) film."""
    h, w = shape
    side = min(h, w)
    return h // 2 - side // 2, w // 2 - side // 2, side


def probabilities(net, film):
    """The (C, 512, 512) sigmoid probabilities of one (1, H, W) film in [-1024, 1024]."""
    x = preprocess(film, net.resolution)[None]
    ctx = next(iter(net.collect_params().values())).list_ctx()[0]
    return expit(net(mx.nd.array(x, ctx=ctx)).asnumpy()[0].astype(np.float64)).astype(np.float32)


def film_masks(probs, shape, threshold=DEFAULT_THRESHOLD):
    """(C, H, W) boolean masks on a (H, W) film from the model's (C, S, S) probabilities: each map
    resized bilinearly to the centred square, thresholded, placed; False outside the square."""
    top, left, side = centre_square(shape)
    masks = np.zeros((len(probs),) + tuple(shape), bool)
    for k, p in enumerate(probs):
        masks[k, top:top + side, left:left + side] = cv2.resize(
            p, (side, side), interpolation=cv2.INTER_LINEAR) > threshold
    return masks


def iter_segment(images, model=DEFAULT_SEGMENTER, weights=None, threshold=DEFAULT_THRESHOLD, ctx=None,
                 strict=False, root=None, progress=False, net=None):
    """Segment films (files or folders), one at a time; yields per film ``{"path", "structures",
    "masks" (C, H, W) bool at the film's size, "probabilities" (C, 512, 512) float32 (the model's
    grid: the centred square), "crop" [top, left, side], "film" (H, W) uint8, "area_fraction"
    {structure: fraction of the square}}``, or ``{"path", "error"}`` for an unreadable file
    (``strict=True`` raises BadImage instead). ``net``: an already loaded :func:`load_segmenter`."""
    threshold = check_threshold(threshold)
    paths = expand_images([images] if isinstance(images, (str, Path)) else images, require=True)
    net = net or load_segmenter(model, weights=weights, ctx=ctx, root=root, progress=progress)
    for path in paths:
        try:
            film = load_xray(path)
        except BadImage as err:
            if strict:
                raise
            yield {"path": str(path), "error": str(err)}
            continue
        probs = probabilities(net, film)
        masks = film_masks(probs, film.shape[1:], threshold)
        top, left, side = centre_square(film.shape[1:])
        yield {"path": str(path), "structures": list(net.targets), "masks": masks, "probabilities": probs,
               "crop": [top, left, side], "film": _grey(film[0]),
               "area_fraction": {name: float(m.sum()) / side ** 2 for name, m in zip(net.targets, masks)}}


def segment(images, **kwargs):
    """:func:`iter_segment` as a list (every film's masks in memory at once)."""
    return list(iter_segment(images, **kwargs))


def _grey(plane):
    """A [-1024, 1024] plane as the uint8 grey levels it was read from."""
    return np.clip(np.round((plane.astype(np.float32) + 1024.0) * (255.0 / 2048.0)), 0, 255).astype(np.uint8)


def structure_file(name):
    """The PNG name of a structure's mask: ``Left Lung`` -> ``Left_Lung.png``."""
    return name.replace(" ", "_") + ".png"


def _rgb(colour):
    return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))


def overlay(film, masks, names, alpha=OVERLAY_ALPHA):
    """An (H, W, 3) uint8 RGB picture: the grey film, each pixel under one or more masks tinted by
    the mean colour of its structures (opacity ``alpha``), every mask outlined in its colour, and a
    legend of the structures present in the top-left corner."""
    colours = [_rgb(PALETTE[k % len(PALETTE)]) for k in range(len(names))]
    base = np.repeat(film[..., None], 3, axis=2).astype(np.float32)
    tint, count = np.zeros_like(base), np.zeros(film.shape, np.float32)
    for mask, colour in zip(masks, colours):
        tint[mask] += colour
        count[mask] += 1
    covered = count > 0
    base[covered] = (1 - alpha) * base[covered] + alpha * tint[covered] / count[covered, None]
    out = np.ascontiguousarray(np.round(base).astype(np.uint8))
    size = min(film.shape)
    line = max(1, int(round(size / 512)))
    for mask, colour in zip(masks, colours):
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, colour, line)
    present = [(n, c) for n, c, m in zip(names, colours, masks) if m.any()]
    if present:
        scale = max(0.35, size / 1400)
        (_, text_h), _ = cv2.getTextSize("Hg", cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        step, pad = int(text_h * 1.8), int(text_h * 0.6)
        width = max(cv2.getTextSize(n, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] for n, _ in present)
        box = out[:min(out.shape[0], pad * 2 + step * len(present)), :min(out.shape[1], pad * 3 + step + width)]
        box[:] = (box * 0.35).astype(np.uint8)  # darkened, so the legend reads on any film
        for i, (name, colour) in enumerate(present):
            y = pad + i * step
            cv2.rectangle(out, (pad, y + pad // 2), (pad + text_h, y + pad // 2 + text_h), colour, -1)
            cv2.putText(out, name, (pad * 2 + text_h, y + pad // 2 + text_h), cv2.FONT_HERSHEY_SIMPLEX,
                        scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def check_out_dir(out_dir):
    """Create ``out_dir`` if needed and make sure files can be written in it: one line if not."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise MxvisionError(out_dir, "is a file; give a folder to write the masks in")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with atomic_path(os.path.join(out_dir, ".write-test")) as tmp:
            open(tmp, "wb").close()
        os.unlink(os.path.join(out_dir, ".write-test"))
    except OSError as err:
        raise MxvisionError(out_dir, "cannot write the masks here (%s)" % (err.strerror or err)) from None
    return out_dir


def _folders(paths):
    """One output folder name per film: its file stem, numbered from the second film of a stem on."""
    seen, names = {}, []
    for path in paths:
        stem = Path(path).stem or "film"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else "%s_%d" % (stem, seen[stem]))
    return names


def write_segmentations(images, out_dir, model=DEFAULT_SEGMENTER, weights=None, threshold=DEFAULT_THRESHOLD,
                        ctx=None, strict=False, root=None, progress=False):
    """Segment films and write their masks, overlays and summaries under ``out_dir`` (see the
    module notes); returns the summary written to ``out_dir/segmentation.json``: per film
    ``{"path", "folder", "height", "width", "crop", "area_fraction"}`` or ``{"path", "error"}``."""
    threshold = check_threshold(threshold)
    out_dir = check_out_dir(out_dir)
    paths = expand_images([images] if isinstance(images, (str, Path)) else images, require=True)
    net = load_segmenter(model, weights=weights, ctx=ctx, root=root, progress=progress)
    names = list(net.targets)
    films = []
    for folder, result in zip(_folders(paths), iter_segment(paths, threshold=threshold, strict=strict, net=net)):
        if "error" in result:
            films.append(result)
            continue
        where = os.path.join(out_dir, folder)
        for name, mask in zip(names, result["masks"]):
            write_png(os.path.join(where, structure_file(name)), mask.astype(np.uint8) * 255)
        write_png(os.path.join(where, "overlay.png"), overlay(result["film"], result["masks"], names)[..., ::-1])
        h, w = result["film"].shape
        films.append({"path": result["path"], "folder": where, "height": h, "width": w, "crop": result["crop"],
                      "area_fraction": result["area_fraction"]})
    summary = {
        "model": model, "weights": net.weights_info["description"], "weights_sha1": net.weights_info.get("sha1"),
        "threshold": threshold,
        "masks": "uint8 PNGs, 255 inside, at each film's own size; sigmoid(logit) > threshold on the centred "
                 "square the model sees (resized bilinearly from 512), 0 outside it",
        "area_fraction": "mask pixels / pixels of the centred square",
        "structures": [{"name": n, "file": structure_file(n), "colour": PALETTE[k % len(PALETTE)]}
                       for k, n in enumerate(names)],
        "overlay": "overlay.png", "films": films}
    write_json(os.path.join(out_dir, "segmentation.json"), summary)
    with atomic_path(os.path.join(out_dir, "areas.csv")) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "folder"] + names + ["error"])
            for film in films:
                areas = ["%.6f" % film["area_fraction"][n] for n in names] if "folder" in film else [""] * len(names)
                writer.writerow([film["path"], film.get("folder", "")] + areas + [film.get("error", "")])
    return summary


class LungMasks:
    """The lungs (Left Lung + Right Lung) of a segmentation model as a lung-mask provider:
    ``provider(img)`` takes a 2-D film (uint8, or float in [0, 1]) and returns its (H, W) boolean
    lung mask at the film's size (what :func:`mxvision.audit.lesion.make_lesion_pairs` places
    nodules in, instead of its estimated mask). ``name`` is what the index records as the source."""

    def __init__(self, net, threshold=DEFAULT_THRESHOLD):
        missing = [n for n in LUNGS if n not in net.targets]
        if missing:
            raise WeightsError(net.weights, "has no %s output to take lung masks from" % " or ".join(missing))
        self.net, self.threshold = net, check_threshold(threshold)
        self.lungs = [net.targets.index(n) for n in LUNGS]
        self.name = net.weights
        self.description = "%s lungs (%s), sigmoid > %g" % (net.weights, net.weights_info["description"], threshold)

    def __call__(self, img):
        img = np.asarray(img)
        unit = img.astype(np.float32) / np.float32(255) if img.dtype == np.uint8 else img.astype(np.float32)
        probs = probabilities(self.net, xray_range(unit))[self.lungs]
        return film_masks(probs, img.shape, self.threshold).any(axis=0)


def lung_mask_provider(model=DEFAULT_SEGMENTER, weights=None, threshold=DEFAULT_THRESHOLD, ctx=None, root=None,
                       progress=False):
    """A :class:`LungMasks` provider of ``model`` with ``weights`` (as :func:`load_segmenter`)."""
    return LungMasks(load_segmenter(model, weights=weights, ctx=ctx, root=root, progress=progress), threshold)
