"""The lesion-insertion check: does a model see nodules, or only how the films were made?

On JSRT the nodule and non-nodule films differ in acquisition, so an image-level AUC there cannot
show that a model sees nodules (see :mod:`mxvision.audit.shortcuts`). This module builds a set in which the
nodule is the *only* difference: it takes real normal radiographs and writes, for each, the film
unchanged and the same film with a simulated nodule (a projected sphere, as
:func:`mxvision.data.synth.insert_nodule` draws it) at a random position inside the lungs. Both
are re-encoded by the same PNG writer from the same uint8 array, so no file property separates
them. A model that scores the with-nodule films higher does it because of the nodule.

Where the lungs are: :mod:`mxvision.data.synth`'s ``random_lung_position`` places nodules inside
nominal lung ellipses of its cartoon films. Checked on the 154 JSRT films at 512 px: only 69 of the
96 real nodule centres fall inside those ellipses, which miss the lateral and lower lung and
overlap the heart of real patients. So positions here come from a per-image lung estimate,
:func:`lung_mask` (Otsu threshold of the smoothed film, intersected with a generous envelope of
where lungs lie on a PA film, largest component per side, closed and hole-filled). It is
conservative: on the 93 JSRT nodule films that are not blank it contains 73 of the real nodule
centres (it misses dense hilar, retrocardiac and costophrenic lung) and it did not leave the thorax
in the films looked at, which is what placing a nodule needs. Blank films get an empty mask. A nodule is placed where its whole disc lies inside the
estimate; the nominal synth geometry is used only when no lung is found (recorded per row).

The lungs can instead come from a segmentation model: :func:`make_lesion_pairs` takes a
``lung_masks`` provider -- any callable giving a film's (H, W) boolean lung mask, with a ``name``
the index records -- such as :func:`mxvision.segmentation.lung_mask_provider` (the ChestX-Det
PSPNet's Left Lung + Right Lung, ``mxvision synth --lung-masks pspnet``). The caller builds it:
this module does not load networks.

Sizes are given for a 512 px film (JSRT's grid: 0.7 mm per pixel) and scaled to each image's
shorter side; defaults are radius 7-20 px (10-28 mm diameter) and contrast 15-40 grey levels.

Index columns written: ``path, label, patient_id, split, view, pair_id, source, nodule_x,
nodule_y, nodule_radius, nodule_contrast, lung_mask``. Every image made from one source film (its
clean copy and its ``variants`` nodule versions) shares ``pair_id`` = ``patient_id`` = the
source's patient, so a pair never straddles splits; the source split is kept, so a model trained
on pairs from train-split films is tested on pairs from films it never saw.
"""
import csv
import os
import zlib

import cv2
import numpy as np
from tqdm import tqdm

from mxvision.data import synth
from mxvision.data.index import Index, write_index
from mxvision.data.splits import assign_splits
from mxvision.errors import BadIndex
from mxvision.io.images import read_image
from mxvision.train.metrics import auc_score

RADIUS_512 = (7.0, 20.0)  # nodule radius in pixels of a 512 px film
CONTRAST = (15.0, 40.0)  # grey levels (of 255) added at the nodule centre
REFERENCE_SIZE = 512
# Where lungs can be on a PA film: (centre x, centre y, half-width, half-height), fractions.
# Generous on purpose (it only excludes what is surely not lung: shoulders, neck, outside air).
_ENVELOPE = ((0.29, 0.44, 0.21, 0.37), (0.71, 0.44, 0.21, 0.37))
# Grey-level spread (1st-99th percentile of the central region) below which a film is treated as
# blank. Three of the shared JSRT films (JPCLN037, 078, 094) span only 247-254 there.
MIN_SPREAD = 25
#: what the ``lung_mask`` column says of a nodule placed in :func:`lung_mask`'s estimate
ESTIMATED = "estimated"
COLUMNS = ("patient_id", "split", "view", "pair_id", "source", "nodule_x", "nodule_y",
           "nodule_radius", "nodule_contrast", "lung_mask")


def to_uint8(img):
    """A [0, 1] float image (``read_image``'s output) as uint8 grey levels."""
    return np.clip(np.round(np.asarray(img, np.float32) * 255.0), 0, 255).astype(np.uint8)


def _disc(size, scale):
    k = max(3, int(round(size * scale)) | 1)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))


def lung_mask(img, offset=0.02):
    """Boolean (H, W) estimate of the aerated lung of a PA chest film (bone bright, lung dark).

    ``img`` is uint8 or a [0, 1] float image. Pixels darker than the Otsu threshold of the central
    region (raised by ``offset`` of full scale) and inside the lung envelope; per side the largest
    component (at least 1% of the image) after an opening, then closed and hole-filled. Empty for
    a blank film or one where nothing lung-like is found; callers fall back to
    :func:`nominal_lung_mask` then.
    """
    img = np.asarray(img)
    grey = img.astype(np.float32) if img.dtype == np.uint8 else to_uint8(img).astype(np.float32)
    h, w = grey.shape
    size = min(h, w)
    smooth = cv2.GaussianBlur(grey, (0, 0), 4.0 * size / REFERENCE_SIZE)
    roi = np.clip(smooth[int(.1 * h):int(.8 * h), int(.1 * w):int(.9 * w)], 0, 255).astype(np.uint8)
    low, high = np.percentile(roi, (1, 99))
    if high - low < MIN_SPREAD:  # a blank or washed-out film: no lung to find
        return np.zeros((h, w), bool)
    threshold, _ = cv2.threshold(roi, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    dark = (smooth < threshold + 255.0 * offset).astype(np.uint8)
    out = np.zeros_like(dark)
    for cx, cy, ax, ay in _ENVELOPE:
        env = np.zeros_like(dark)
        cv2.ellipse(env, (int(cx * w), int(cy * h)), (int(ax * w), int(ay * h)), 0, 0, 360, 1, -1)
        part = cv2.morphologyEx(dark & env, cv2.MORPH_OPEN, _disc(size, 11 / 512))
        n, labels, stats, _ = cv2.connectedComponentsWithStats(part, connectivity=4)
        if n < 2:
            continue
        best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        if stats[best, cv2.CC_STAT_AREA] >= 0.01 * h * w:
            out |= (labels == best).astype(np.uint8)
    out = cv2.morphologyEx(out, cv2.MORPH_CLOSE, _disc(size, 21 / 512))
    contours, _ = cv2.findContours(out, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(out)
    cv2.drawContours(filled, contours, -1, 1, thickness=-1)
    return filled.astype(bool)


def nominal_lung_mask(shape):
    """The nominal lung fields of :mod:`~mxvision.data.synth`'s cartoon films, placed in the
    centred square: a stand-in where :func:`lung_mask` finds nothing."""
    h, w = shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    mask = np.zeros(shape, np.uint8)
    for cx, cy, ax, ay in synth.LUNGS:
        cv2.ellipse(mask, (int(left + cx * side), int(top + cy * side)), (int(ax * side), int(ay * side)),
                    0, 0, 360, 1, -1)
    return mask.astype(bool)


def _central_square(shape):
    """The largest centred square (what every preprocessing preset keeps), as a boolean mask."""
    h, w = shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    keep = np.zeros(shape, bool)
    keep[top:top + side, left:left + side] = True
    return keep


def lung_depth(mask):
    """Distance (px) from each point of ``mask`` within the central square to the mask's edge:
    what :func:`random_position` places nodules with. Computing it once per film and passing it
    as ``depth`` saves a distance transform per nodule (training inserts thousands)."""
    inside = mask & _central_square(mask.shape)
    return cv2.distanceTransform(inside.astype(np.uint8), cv2.DIST_L2, 5) if inside.any() else None


def random_position(rng, mask, radius, depth=None, source=ESTIMATED):
    """A random (x, y) where a disc of ``radius`` lies inside ``mask`` (uniform over such points).

    Returns ``(x, y, source)`` (``source`` names where ``mask`` came from); when no such point
    exists, a point at the mask's deepest spot; when the mask is empty, the nominal lung geometry
    of :mod:`~mxvision.data.synth` scaled to the image (``"nominal"``). ``depth``:
    :func:`lung_depth` of ``mask``, if known.
    """
    if depth is None:
        depth = lung_depth(mask)
    if depth is not None:
        ys, xs = np.nonzero(depth >= min(radius, depth.max()))
        k = int(rng.integers(len(xs)))
        return float(xs[k]) + rng.uniform(-0.5, 0.5), float(ys[k]) + rng.uniform(-0.5, 0.5), source
    h, w = mask.shape
    side = min(h, w)
    x, y = synth.random_lung_position(rng, side)
    return x + (w - side) / 2, y + (h - side) / 2, "nominal"


def insert_random_nodule(img, mask, rng, radius=RADIUS_512, contrast=CONTRAST, depth=None, source=ESTIMATED):
    """``img`` (uint8) with one simulated nodule in the lungs, drawn by
    :func:`mxvision.data.synth.insert_nodule`; returns ``(image, nodule)`` with nodule
    ``{"x", "y", "radius", "contrast", "lung_mask"}`` in pixels of ``img``. ``depth``: the
    film's :func:`lung_depth`, if known; ``source``: what ``mask`` is (see :func:`random_position`)."""
    scale = min(img.shape) / REFERENCE_SIZE
    r = rng.uniform(*radius) * scale
    c = rng.uniform(*contrast)
    x, y, where = random_position(rng, mask, r, depth, source)
    out = synth.insert_nodule(img, (x, y), r, c, rng)
    return out, {"x": x, "y": y, "radius": r, "contrast": c, "lung_mask": where}


def nodule_versions(img, image_id, variants, seed=0, mask=None, radius=RADIUS_512, contrast=CONTRAST,
                    source=ESTIMATED):
    """The ``variants`` nodule versions of one film that :func:`make_lesion_pairs` writes, as a
    list of ``(image, nodule)``: draws depend only on (seed, image id, k), so a detector can
    rebuild in memory exactly the pairs ``mxvision synth`` would write for its validation films.
    ``mask``: the film's lung mask (default: :func:`lung_mask`), ``source`` what it is."""
    mask = lung_mask(img) if mask is None else mask
    depth = lung_depth(mask)
    return [insert_random_nodule(img, mask, np.random.default_rng([seed, zlib.crc32(image_id.encode()), k]),
                                 radius, contrast, depth, source) for k in range(variants)]


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def make_lesion_pairs(index, out_dir, variants=1, radius=RADIUS_512, contrast=CONTRAST, seed=0,
                      label="normal", splits=None, progress=True, lung_masks=None):
    """Write the with/without-nodule set made from the ``label`` rows of ``index``; return the
    written :class:`~mxvision.data.index.Index` (``out_dir/index.csv``).

    ``index`` is an Index or an index CSV path. Per source film: ``images/normal/<stem>.png`` (the
    film re-encoded) and ``variants`` files ``images/nodule/<stem>_n<k>.png``. ``splits`` keeps
    only sources of those splits; sources without a split get a patient-grouped one. The random
    draws of a film depend only on (seed, its id, k), so adding films changes no existing image.
    ``lung_masks``: where the lungs are -- a callable giving a film's (H, W) boolean lung mask
    (uint8 film in), whose ``name`` the ``lung_mask`` column records (e.g.
    :func:`mxvision.segmentation.lung_mask_provider`); default: the estimate :func:`lung_mask`.
    """
    from mxvision.features.extract import load_index

    index = load_index(index)
    if variants < 1:
        raise ValueError("variants must be at least 1")
    out_dir = os.path.abspath(os.fspath(out_dir))
    rows = [i for i, lab in enumerate(index.labels) if lab == label]
    if splits is not None:
        rows = [i for i in rows if index.splits[i] in splits]
    if not rows:
        raise BadIndex(index.source, f"no {label!r} images{' in split(s) ' + ', '.join(splits) if splits else ''} "
                                     "to insert nodules into")
    unique_stems = len(set(map(_stem, index.ids))) == len(index)
    source = ESTIMATED if lung_masks is None else str(lung_masks.name)
    records = []
    for i in tqdm(rows, desc="synth", unit="img", disable=not progress):
        path, image_id = index.paths[i], index.ids[i]
        img = to_uint8(read_image(path))
        mask = lung_mask(img) if lung_masks is None else np.asarray(lung_masks(img), bool)
        patient = index.patient_ids[i]
        base = {"patient_id": patient, "split": index.splits[i], "view": index.views[i] or "PA",
                "pair_id": patient, "source": path}
        stem = _stem(image_id) if unique_stems else image_id.replace("/", "_").rsplit(".", 1)[0]
        clean = os.path.join(out_dir, "images", "normal", f"{stem}.png")
        synth.write_png(clean, img)  # the same writer for both members of a pair
        records.append(dict(base, path=clean, label="normal"))
        for k, (with_nodule, nodule) in enumerate(nodule_versions(img, image_id, variants, seed, mask,
                                                                 radius, contrast, source)):
            target = os.path.join(out_dir, "images", "nodule", f"{stem}_n{k}.png")
            synth.write_png(target, with_nodule)
            records.append(dict(base, path=target, label="nodule", nodule_x=f"{nodule['x']:.1f}",
                                nodule_y=f"{nodule['y']:.1f}", nodule_radius=f"{nodule['radius']:.2f}",
                                nodule_contrast=f"{nodule['contrast']:.1f}",
                                lung_mask=nodule["lung_mask"]))
    out = Index(records, out_dir, columns=COLUMNS, classes=["normal", "nodule"],
                source=os.path.join(out_dir, "index.csv"))
    if not all(out.splits):
        out = assign_splits(out, seed=seed)
    write_index(out, os.path.join(out_dir, "index.csv"))
    return out


def paired_auc(index, scores):
    """The fraction of (film, same film with a nodule) pairs in which the nodule version scores
    higher (ties count half): the AUC restricted to matched pairs, so patient-to-patient variation
    cancels. ``scores`` maps image id (or absolute path) -> nodule score; pairs with a member
    missing from ``scores`` are left out. Returns ``(value, n_pairs)``; NaN when no pair."""
    by_pair = {}
    for rec, image_id in zip(index.records(), index.ids):
        score = scores.get(image_id, scores.get(rec["path"]))
        if score is not None:
            by_pair.setdefault(rec.get("pair_id") or rec["patient_id"], []).append((rec["label"], score))
    wins = n = 0
    for members in by_pair.values():
        clean = [s for lab, s in members if lab == "normal"]
        for lab, s in members:
            if lab == "nodule":
                for c in clean:
                    wins += 1.0 if s > c else 0.5 if s == c else 0.0
                    n += 1
    return (wins / n if n else float("nan")), n


def read_prediction_scores(predictions_csv, positive="nodule"):
    """``id -> p_<positive>`` from the ``predictions.csv`` that ``mxvision evaluate`` writes."""
    with open(predictions_csv, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        column = f"p_{positive}"
        if column not in (reader.fieldnames or []):
            raise BadIndex(predictions_csv, f"no column {column}; expected evaluate's predictions.csv")
        return {row["id"]: float(row[column]) for row in reader}


# --- figures of a scored lesion-insertion set (arrays: label 1 = nodule, group = source film) ---

def paired_auc_arrays(labels, groups, scores):
    """:func:`paired_auc` on arrays: the fraction of (clean film, same film with a nodule) pairs
    in which the nodule version scores higher, ties half; NaN when no pair."""
    clean = {}
    for y, g, s in zip(labels, groups, scores):
        if not y:
            clean.setdefault(g, []).append(s)
    wins = [float(s > c) + 0.5 * float(s == c) for y, g, s in zip(labels, groups, scores) if y
            for c in clean.get(g, [])]
    return float(np.mean(wins)) if wins else float("nan")


def film_bootstrap(labels, groups, scores, resamples=2000, seed=0):
    """95 % percentile intervals of the AUC and paired AUC, resampling *source films* with
    replacement: every image made from one film moves together, because they share its anatomy
    (a per-image bootstrap would pretend 10 versions of one film are 10 films)."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    films = sorted(set(groups))
    rows = {g: np.flatnonzero([x == g for x in groups]) for g in films}
    rng = np.random.default_rng(seed)
    aucs, paired = [], []
    for _ in range(resamples):
        pick = [rows[films[i]] for i in rng.integers(len(films), size=len(films))]
        idx = np.concatenate(pick)
        draw = np.concatenate([np.full(len(p), j) for j, p in enumerate(pick)])  # a film drawn twice
        aucs.append(auc_score(labels[idx], scores[idx]))                       # is two films
        paired.append(paired_auc_arrays(labels[idx], draw, scores[idx]))
    ci = lambda v: [float(x) for x in np.nanpercentile(v, (2.5, 97.5))]  # noqa: E731
    return {"auc": ci(aucs), "paired_auc": ci(paired), "resamples": resamples, "unit": "source film"}


def auc_by_bin(labels, groups, scores, values, edges):
    """Per bin of ``values`` (a nodule property, e.g. contrast; ignored for clean images): the AUC
    of that bin's nodule images against all clean images, and their paired AUC. Values outside
    ``edges`` count in the end bins."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    bins = np.clip(np.searchsorted(edges, np.nan_to_num(np.asarray(values, float)), side="right") - 1,
                   0, len(edges) - 2)
    out = []
    for b, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        keep = (labels == 0) | (bins == b)
        n = int(((labels == 1) & (bins == b)).sum())
        out.append({"range": [round(float(lo), 2), round(float(hi), 2)], "n": n,
                    "auc": auc_score(labels[keep], scores[keep]) if n else float("nan"),
                    "paired_auc": paired_auc_arrays(labels[keep], [g for g, k in zip(groups, keep) if k],
                                                    scores[keep])})
    return out
