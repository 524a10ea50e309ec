"""Synthetic chest radiographs in pairs, without and with a lesion, for a demo that needs no downloads.

The images are cartoons of a PA chest film: a body outline of soft tissue, two dark lung fields
with soft lung markings, a bright mediastinum, heart and spine, faint ribs, and quantum noise.

The films come in pairs (:func:`synthetic_image`): one patient's anatomy (lungs, heart, ribs,
tissue levels, markings) filmed once without and once with a lesion, the two films sharing
``patient_id`` so the patient-grouped split keeps them together; each film's exposure (gain,
offset and gamma of its grey levels, and its noise, :data:`EXPOSURE`) is drawn from its own stream,
the same way whatever its label. So the classes differ only by the lesion: a grey-level histogram
or overall brightness says nothing about the label (tests/data/test_synth.py: mean and standard
deviation of a film separate the classes with AUC 0.35-0.65 over 100 pairs).

The lesion (:func:`add_textured_lesion`, :data:`LESION`) is a patch of speckle under a Gaussian
envelope (sigma 19-25 px at 256, amplitude 60-80 grey levels) with no net density: texture, not
brightness. That is on purpose, and not how a real nodule looks (a real one is an opacity). An
earlier version drew a projected sphere as dense as soft tissue; with random backbone weights --
the only ones these machines have -- a 32x32 thumbnail found such a nodule as well as the features
did (in every variant of size, contrast, markings and position tried, a logistic regression on the
features and the audit's thumb32 baseline stayed within 0.06 AUC), and the demo could only show
its own shortcut warning. Texture without density is invisible to the shortcut audit's grey-level
histogram and thumbnails, while a convolution followed by a ReLU -- random or trained -- responds to
local energy, so the demo can show a head that sees something no trivial baseline sees.

Measured with ``make figures`` (README's results table: ``mxvision demo``, 160 pairs, split
232 / 48 / 40 by patient, 2 OpenMP threads, 2026-12-05, AMD EPYC 2 cores): the head with its Platt
calibrator reaches the test AUC in the table, every baseline (histogram, thumb4, thumb32) at or
below chance. Exploring the lesion on the same films (a logistic regression on the stored features
and the baselines, seed 0): speckle amplitude 70 over sigma 22 px gave features 0.92, baselines
0.52-0.56; amplitude 130 over 18 px let the histogram see the added spread (0.91); a density-free
difference of Gaussians (amplitude 60-120, sigma 4-6 px) was too faint for the features (0.51-0.70).

:func:`make_synthetic_dataset` writes pairs with ``paired=True`` (``mxvision demo``); without, it
writes the earlier unpaired films (:func:`unpaired_image`: each class its own patients, the films
with a nodule brighter overall, which a histogram separates), kept byte for byte for the small
fixtures of the unit tests that need a dozen films a few epochs can learn.

Everything is drawn from numpy ``Generator`` streams seeded per (seed, pair) for the anatomy,
(seed, pair, 2) and (seed, pair, 3) for the lesion's place and speckle and (seed, pair, image, 1)
for each film's exposure and noise, so a
dataset is byte-for-byte reproducible and adding pairs does not change the existing ones.
"""
import os

import cv2
import numpy as np

from mxvision.data.index import Index, write_index
from mxvision.data.splits import assign_splits
from mxvision.utils import atomic_path

CLASSES = ("normal", "nodule")
# Nominal lung fields as (centre x, centre y, half-width, half-height), fractions of the size.
# Image left is the patient's right lung, which is a little larger (the heart sits on the other).
LUNGS = ((0.32, 0.45, 0.155, 0.30), (0.68, 0.47, 0.145, 0.28))
HEART = (0.57, 0.66, 0.125)  # nominal centre x, y and radius, fractions of the size
VARIABILITY = 0.3  # scale of the patient-to-patient jitter of the anatomy (random_anatomy)
NODULE_RADIUS = (18 / 256, 32 / 256)  # fractions of the image size
NODULE_CONTRAST = (80, 120)  # grey levels added at the centre: lung + this ~ soft tissue
#: Lung markings of the paired films (:func:`random_anatomy`): how many soft Gaussian blobs, their
#: sigma (fraction of the size) and amplitude (grey levels, either sign).
#: The paired films' lesion (:func:`add_textured_lesion`): envelope sigma (fraction of the size)
#: and speckle amplitude (grey levels). Chosen on the demo's films (module docstring).
LESION = {"sigma": (19 / 256, 25 / 256), "amplitude": (60.0, 80.0)}
MARKINGS = {"count": 8, "sigma": (0.12, 0.3), "amplitude": (-40.0, 40.0)}
#: Ranges of each film's exposure, drawn independently of its label (:func:`random_exposure`):
#: grey-level gain and offset, gamma of the film's response, sigma of the quantum noise.
EXPOSURE = {"gain": (0.75, 1.25), "offset": (-20.0, 20.0), "gamma": (0.8, 1.25), "noise": (3.0, 5.0)}


def random_anatomy(rng, variability=None, markings=0):
    """The per-patient shape of the chest: jitter of lungs, heart, ribs and exposure levels.
    ``variability`` scales every jitter (0 gives the same chest for every patient). ``markings``:
    that many soft blobs of denser or lighter lung (vessels, overlying soft tissue), see
    :data:`MARKINGS`; drawn after everything else, so 0 leaves the other draws as they were."""
    variability = VARIABILITY if variability is None else variability

    def around(centre, half):
        return centre + variability * rng.uniform(-half, half, size=np.shape(centre))
    anatomy = {
        "lung_scale": around(np.ones(2), 0.08),
        "lung_shift": around(np.zeros((2, 2)), 0.02),
        "heart": tuple(around(np.array(HEART), np.array([0.02, 0.02, 0.015]))),
        "rib_phase": around(0.5, 0.5),
        "rib_spacing": around(0.072, 0.008),
        "levels": tuple(around(np.array([57.0, 150.0, 197.0]), np.array([12.0, 15.0, 17.0]))),
        "body_width": around(0.435, 0.025),
    }
    if markings:
        lungs = rng.integers(2, size=markings)
        centre = np.array([LUNGS[k][:2] for k in lungs])
        half = np.array([LUNGS[k][2:] for k in lungs])
        anatomy["markings"] = np.column_stack([
            centre + half * rng.uniform(-1, 1, size=(markings, 2)),  # x, y
            rng.uniform(*MARKINGS["sigma"], size=markings),
            rng.uniform(*MARKINGS["amplitude"], size=markings)])
    return anatomy


def _ellipse(canvas, centre, axes, value, size, angle=0.0):
    """Fill an ellipse given in fractions of ``size`` (anti-aliased via a later blur)."""
    cv2.ellipse(canvas, (int(round(centre[0] * size)), int(round(centre[1] * size))),
                (max(1, int(round(axes[0] * size))), max(1, int(round(axes[1] * size)))),
                angle, 0, 360, float(value), thickness=-1)


def lung_geometry(anatomy):
    """The two lung ellipses of one patient, in fractions of the size."""
    out = []
    for (cx, cy, ax, ay), scale, shift in zip(LUNGS, anatomy["lung_scale"], anatomy["lung_shift"]):
        out.append((cx + shift[0], cy + shift[1], ax * scale, ay * scale))
    return out


def _ribs(size, anatomy, lungs):
    """Faint rib shadows (and the clavicles): per side, bands spaced down the lung that fall
    gently away from the spine."""
    ribs = np.zeros((size, size), np.float32)
    thickness = max(1, int(round(0.024 * size)))
    spacing = anatomy["rib_spacing"]
    for side, (cx, cy, ax, ay) in enumerate(lungs):
        lateral = -1 if side == 0 else 1
        d = np.linspace(0.03, abs(cx - 0.5) + ax + 0.02, 24)  # distance from the midline
        y0 = cy - ay + (anatomy["rib_phase"] - 0.5) * spacing
        while y0 < cy + ay:
            ys = y0 + 0.6 * d * d + 0.1 * d
            pts = np.stack([(0.5 + lateral * d) * size, ys * size], axis=1).round().astype(np.int32)
            cv2.polylines(ribs, [pts], False, 1.0, thickness=thickness, lineType=cv2.LINE_AA)
            y0 += spacing
        clavicle = np.array([[0.5 + lateral * 0.05, 0.17], [0.5 + lateral * 0.30, 0.13]]) * size
        cv2.polylines(ribs, [clavicle.round().astype(np.int32)], False, 3.0,
                      thickness=thickness + 1, lineType=cv2.LINE_AA)
    return ribs


def _trunk(size, half_width):
    """Soft-tissue outline: a rounded rectangle (superellipse) with shoulders, plus the neck."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    x = (c[None, :] - 0.5) / half_width
    y = (c[:, None] - 0.64) / 0.58
    body = (np.abs(x) ** 3 + np.abs(y) ** 3 <= 1).astype(np.float32)
    body[: int(0.12 * size), int(0.44 * size): int(0.56 * size)] = 1.0
    return body


def random_exposure(rng):
    """One film's exposure, drawn from ``rng`` and nothing else: the gain, offset and gamma of
    its grey levels and the sigma of its quantum noise (see :data:`EXPOSURE`)."""
    return {name: float(rng.uniform(*EXPOSURE[name])) for name in ("gain", "offset", "gamma", "noise")}


def make_radiograph(rng, size=256, anatomy=None, exposure=None, nodule=None):
    """A CXR-like uint8 image ``(size, size)``; ``anatomy`` (from :func:`random_anatomy`) fixes the
    patient so several images of one patient differ only in exposure and noise.

    ``exposure`` (:func:`random_exposure`'s dict) sets the film's grey-level gain, offset, gamma and
    noise; without it a mild exposure is drawn from ``rng`` (gain 0.92-1.08, offset +-8, noise 4).
    Either way ``rng`` draws the noise. ``nodule`` = ``(x, y, radius, contrast, ratio, angle)``
    (pixels, grey levels, :func:`nodule_profile`'s outline) adds a nodule to the body before the
    exposure, blur and noise, as a real one is part of what the film records.
    """
    if anatomy is None:
        anatomy = random_anatomy(rng)
    lung_level, tissue_level, bone_level = anatomy["levels"]
    img = np.full((size, size), 12.0, np.float32)  # air outside the body
    body = _trunk(size, anatomy["body_width"])
    img = img * (1 - body) + tissue_level * body
    lungs = lung_geometry(anatomy)
    lung_mask = np.zeros((size, size), np.float32)
    for cx, cy, ax, ay in lungs:
        _ellipse(lung_mask, (cx, cy), (ax, ay), 1.0, size)
    hx, hy, hr = anatomy["heart"]
    heart = np.zeros((size, size), np.float32)
    _ellipse(heart, (hx, hy), (hr, hr * 0.8), 1.0, size, angle=-20)
    lung_mask = np.clip(lung_mask - heart, 0, 1)
    lung_mask = cv2.GaussianBlur(lung_mask, (0, 0), 0.02 * size)
    img = img * (1 - lung_mask) + lung_level * lung_mask
    # mediastinum and spine: bright vertical structures down the middle
    xs = np.arange(size, dtype=np.float32) / size
    spine = np.exp(-((xs - 0.5) / 0.035) ** 2)[None, :] * np.ones((size, 1), np.float32)
    spine[: int(0.08 * size)] = 0
    img = img * (1 - 0.8 * spine) + bone_level * 0.8 * spine
    ribs = _ribs(size, anatomy, lungs)
    ribs = cv2.GaussianBlur(ribs, (0, 0), 0.006 * size) * np.maximum(lung_mask, 0.3 * body)
    img += 0.15 * (bone_level - lung_level) * ribs
    if len(anatomy.get("markings", ())):
        grid = (np.arange(size, dtype=np.float32) + 0.5) / size
        blobs = np.zeros((size, size), np.float32)
        for x, y, sigma, amplitude in anatomy["markings"]:
            blobs += amplitude * np.outer(np.exp(-0.5 * ((grid - y) / sigma) ** 2),
                                          np.exp(-0.5 * ((grid - x) / sigma) ** 2))
        img += blobs * lung_mask
    if nodule is not None:
        x, y, radius, contrast, ratio, angle = nodule
        found = nodule_profile(img.shape, (x, y), radius, ratio, angle)
        if found is not None:
            (y0, y1, x0, x1), profile = found
            img[y0:y1, x0:x1] += contrast * profile
    # exposure, then blur (unsharp film) and quantum noise
    if exposure is None:
        img = img * rng.uniform(0.92, 1.08) + rng.uniform(-8, 8)
        noise = 4.0
    else:
        img = 255.0 * (np.clip(img, 0, 255) / 255.0) ** exposure["gamma"]
        img = img * exposure["gain"] + exposure["offset"]
        noise = exposure["noise"]
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 0.004 * size + 0.5)
    img += rng.normal(0.0, noise, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).round().astype(np.uint8)


def nodule_profile(shape, center, radius_px, ratio, angle):
    """The nodule's thickness profile ``sqrt(1 - r^2/R^2)`` (outline stretched by ``ratio``,
    turned by ``angle``, soft-edged), computed on a window around ``center`` = (x, y) pixels of an
    image of ``shape``; returns ``((y0, y1, x0, x1), profile)`` or None when the nodule lies wholly
    outside the image. The window reaches past the ellipse by twice the blur's kernel radius, so
    the blur sees only zeros beyond it and the result is bit-identical to computing the profile
    over the whole image (about 0.1 ms instead of 6 ms on a 512 px film; tests/data/test_synth.py
    keeps that reference)."""
    h, w = shape
    sigma = max(0.5, 0.08 * radius_px)
    reach = int(np.ceil(1.15 * radius_px + 8 * sigma)) + 2
    x0, y0 = max(0, int(center[0]) - reach), max(0, int(center[1]) - reach)
    x1, y1 = min(w, int(center[0]) + reach + 1), min(h, int(center[1]) + reach + 1)
    if x0 >= x1 or y0 >= y1:
        return None
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xx - center[0], yy - center[1]
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / (radius_px * ratio)
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / (radius_px / ratio)
    profile = cv2.GaussianBlur(np.sqrt(np.clip(1.0 - u * u - v * v, 0, None)), (0, 0), sigma)
    return (y0, y1, x0, x1), profile


def insert_nodule(img, center, radius_px, contrast, rng):
    """A copy of ``img`` (uint8) with a nodule at ``center`` = (x, y) pixels: a projected sphere
    whose brightness is ``contrast * sqrt(1 - r^2/R^2)``, slightly elliptical and soft-edged,
    clipped to uint8. Draws two numbers from ``rng`` (the outline's aspect ratio and angle).

    The one nodule renderer (:func:`nodule_profile`): the synthetic films, the lesion-insertion
    pairs and the detector's training (a nodule per sample) all use it.
    """
    ratio = rng.uniform(0.85, 1.15)  # lobulated, not a perfect circle
    angle = rng.uniform(0, np.pi)
    out = img.copy()
    found = nodule_profile(img.shape, center, radius_px, ratio, angle)
    if found is None:  # the nodule lies wholly outside the film
        return out
    (y0, y1, x0, x1), profile = found
    window = img[y0:y1, x0:x1].astype(np.float32) + contrast * profile
    out[y0:y1, x0:x1] = np.clip(window, 0, 255).round()
    return out


def random_lung_position(rng, size=256):
    """A random (x, y) pixel position well inside one of the nominal lung fields: uniform over the
    inner 60% of the ellipse and clear of the heart, so a nodule stays in aerated lung despite the
    per-patient jitter."""
    hx, hy, hr = HEART
    while True:
        cx, cy, ax, ay = LUNGS[int(rng.integers(2))]
        r = 0.6 * np.sqrt(rng.uniform())
        t = rng.uniform(0, 2 * np.pi)
        x, y = cx + r * ax * np.cos(t), cy + r * ay * np.sin(t)
        if np.hypot(x - hx, (y - hy) / 0.8) > hr + 0.05:
            return float(x * size), float(y * size)


def spread_lung_position(rng, size=256, spread=0.4):
    """A random (x, y) pixel position in one of the nominal lung fields, clear of the heart,
    whose density falls off smoothly from the lung's centre (a Gaussian of ``spread`` lung
    half-axes, cut at 0.8): unlike a uniform draw over a region it has no edge that a linear
    model on a thumbnail could find (the edge of where nodules may be is itself a signal)."""
    hx, hy, hr = HEART
    while True:
        cx, cy, ax, ay = LUNGS[int(rng.integers(2))]
        u, v = rng.normal(0.0, spread, size=2)
        if u * u + v * v > 0.8 ** 2:
            continue
        x, y = cx + u * ax, cy + v * ay
        if np.hypot(x - hx, (y - hy) / 0.8) > hr + 0.05:
            return float(x * size), float(y * size)


def write_png(path, img):
    """Encode ``img`` as PNG and write it atomically (a crash never leaves half a file); the one
    PNG writer of the synthetic films and of both members of a lesion-insertion pair."""
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise RuntimeError(f"cv2 could not encode {path}")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(buf.tobytes())


def pair_lesion(seed, pair, size=256):
    """The lesion of pair ``pair``: ``(x, y, radius, amplitude, sigma)`` in pixels and grey levels
    of a ``size`` film (``radius`` = 2 ``sigma``, where its envelope has fallen to e^-2), from the
    pair's own stream (so it does not depend on any film's draws)."""
    rng = np.random.default_rng([seed, pair, 2])
    x, y = spread_lung_position(rng, size)
    sigma = rng.uniform(*LESION["sigma"]) * size
    return (x, y, 2.0 * sigma, rng.uniform(*LESION["amplitude"]), sigma)


def add_textured_lesion(img, center, sigma, amplitude, rng):
    """A copy of ``img`` (uint8) with a textured lesion at ``center`` = (x, y) pixels: white
    speckle of ``amplitude`` grey levels (standard deviation) under a Gaussian envelope of
    ``sigma`` pixels, with no net density -- it adds texture, not brightness, so no grey-level
    histogram or thumbnail finds it, while convolutions (even random ones: a ReLU of a random
    filter responds to local energy) do. Drawn from ``rng`` on a window of 3 sigma; nothing changes
    beyond 3 sigma (1.5 ``radius`` of :func:`pair_lesion`)."""
    h, w = img.shape
    reach = int(np.ceil(3 * sigma))
    x0, y0 = max(0, int(center[0]) - reach), max(0, int(center[1]) - reach)
    x1, y1 = min(w, int(center[0]) + reach + 1), min(h, int(center[1]) + reach + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dist2 = (xx - center[0]) ** 2 + (yy - center[1]) ** 2
    envelope = np.exp(-dist2 / (2 * sigma * sigma)) * (dist2 <= 9 * sigma * sigma)  # cut at 3 sigma
    speckle = rng.normal(0.0, 1.0, size=envelope.shape).astype(np.float32)
    out = img.copy()
    window = img[y0:y1, x0:x1].astype(np.float32) + amplitude * speckle * envelope
    out[y0:y1, x0:x1] = np.clip(window, 0, 255).round()
    return out


def synthetic_image(seed, label, pair, size=256, with_nodule=True):
    """The ``label`` film of synthetic pair ``pair`` as :func:`make_synthetic_dataset` writes it;
    returns ``(image, lesion)``, lesion ``(x, y, radius, amplitude, sigma)`` (:func:`pair_lesion`)
    or None.

    Both films of a pair are one patient: the anatomy comes from the stream (seed, pair), the
    lesion's place and size from (seed, pair, 2) and its speckle from (seed, pair, 3), and each
    film's exposure and noise from (seed, pair, image, 1) with image 0 for the normal film and 1
    for the nodule film, so the films differ only by the lesion and by an exposure drawn the same
    way whatever the label. ``with_nodule=False`` renders the nodule film (same exposure, same
    noise) without its lesion.
    """
    image = CLASSES.index(label)
    anatomy = random_anatomy(np.random.default_rng([seed, pair]), markings=MARKINGS["count"])
    film_rng = np.random.default_rng([seed, pair, image, 1])
    exposure = random_exposure(film_rng)
    img = make_radiograph(film_rng, size, anatomy=anatomy, exposure=exposure)
    if label != "nodule":
        return img, None
    lesion = pair_lesion(seed, pair, size)
    if with_nodule:
        x, y, _, amplitude, sigma = lesion
        img = add_textured_lesion(img, (x, y), sigma, amplitude, np.random.default_rng([seed, pair, 3]))
    return img, lesion


def unpaired_image(seed, label, patient, shot=0, size=256, with_nodule=True):
    """Image ``shot`` of unpaired patient ``patient`` of class ``label`` (each class its own
    patients, a mild exposure), as :func:`make_synthetic_dataset` writes with ``paired=False``;
    returns ``(image, nodule)`` with nodule ``(x, y, radius, contrast)`` or None.
    ``with_nodule=False`` renders the same film without its nodule.

    These classes differ in more than the nodule (the films with one are brighter overall, and a
    grey-level histogram separates them): the small fixtures of the unit tests use them because
    a few epochs on a dozen films learn them; a demo or a figure uses the pairs."""
    class_id = CLASSES.index(label)
    rng = np.random.default_rng([seed, class_id, patient])
    anatomy = random_anatomy(rng)
    img = make_radiograph(np.random.default_rng([seed, class_id, patient, shot, 1]), size,
                          anatomy=anatomy)
    if label != "nodule":
        return img, None
    x, y = random_lung_position(rng, size)
    nodule = (x, y, rng.uniform(*NODULE_RADIUS) * size, rng.uniform(*NODULE_CONTRAST))
    if with_nodule:
        shape_rng = np.random.default_rng([seed, class_id, patient, 2])  # same on every shot
        img = insert_nodule(img, nodule[:2], nodule[2], nodule[3], shape_rng)
    return img, nodule


def make_synthetic_dataset(out_dir, n_per_class=40, size=256, seed=0, images_per_patient=1,
                           val=0.15, test=0.15, paired=False):
    """Write ``out_dir/images/{normal,nodule}/*.png`` and ``out_dir/index.csv``; return the CSV
    path.

    ``paired=True`` (the demo): ``n_per_class`` pairs, each one patient filmed without and with a
    lesion (:func:`synthetic_image`), so both films share ``patient_id`` (and ``pair_id``) and the
    patient-grouped split keeps a pair together; ``images_per_patient`` must be 1.
    ``paired=False``: ``n_per_class`` films per class from separate patients (:func:`unpaired_image`),
    ``images_per_patient`` images each (same anatomy and nodule, new exposure and noise) -- classes
    a trivial baseline separates, for small test fixtures.

    The index has path, label, patient_id, split, view (paired: pair_id) and, for nodule rows,
    nodule_x, nodule_y, nodule_radius (pixels). Same arguments, same bytes (with the same numpy
    and OpenCV builds); more pairs or patients leave the existing films as they were.
    """
    if n_per_class < 1 or images_per_patient < 1:
        raise ValueError("n_per_class and images_per_patient must be at least 1")
    if paired and images_per_patient != 1:
        raise ValueError("paired films are one pair per patient: images_per_patient must be 1")
    out_dir = os.path.abspath(os.fspath(out_dir))
    records = []
    if paired:
        for pair in range(n_per_class):
            for label in CLASSES:
                img, nodule = synthetic_image(seed, label, pair, size)
                pid = f"syn-{pair:04d}"
                rec = {"label": label, "patient_id": pid, "pair_id": pid, "view": "PA",
                       "path": os.path.join(out_dir, "images", label, f"{pid}.png")}
                records.append(_with_nodule_columns(rec, nodule))
                write_png(rec["path"], img)
        columns = ("patient_id", "pair_id", "split", "view", "nodule_x", "nodule_y", "nodule_radius")
    else:
        for label in CLASSES:
            for k in range(n_per_class):
                patient, shot = divmod(k, images_per_patient)
                img, nodule = unpaired_image(seed, label, patient, shot, size)
                pid = f"syn-{label}-{patient:04d}"
                rec = {"label": label, "patient_id": pid, "view": "PA",
                       "path": os.path.join(out_dir, "images", label, f"{pid}_{shot}.png")}
                records.append(_with_nodule_columns(rec, nodule))
                write_png(rec["path"], img)
        columns = ("patient_id", "split", "view", "nodule_x", "nodule_y", "nodule_radius")
    index = assign_splits(Index(records, out_dir, columns=columns, source=out_dir),
                          val=val, test=test, seed=seed)
    return write_index(index, os.path.join(out_dir, "index.csv"))


def _with_nodule_columns(rec, nodule):
    if nodule is not None:
        x, y, radius = nodule[:3]
        rec.update(nodule_x=f"{x:.1f}", nodule_y=f"{y:.1f}", nodule_radius=f"{radius:.1f}")
    return rec
