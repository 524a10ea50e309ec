"""Synthetic chest radiographs with and without a nodule, for a demo that needs no downloads.

The images are cartoons of a PA chest film: a body outline of soft tissue, two dark lung fields,
a bright mediastinum, heart and spine, faint ribs, and quantum noise. A nodule is a projected
sphere (a uniform ball seen in projection has thickness proportional to sqrt(1 - r^2/R^2)) added
inside a lung, away from the heart. Nodules are large (radius 18-32 px at 256) and as dense as soft
tissue, and patients vary only moderately (``VARIABILITY``), on purpose: the demo must separate the
classes with *random-weight* ResNet-50 features (smaller, fainter nodules with full jitter were
not separated by them). The price: the classes also differ in overall intensity, so the shortcut
audit's grey-level histogram or thumbnail baseline separates them too and the demo warns so; the
demo shows that the pipeline runs, not that it finds nodules. Measured on the demo's 80 images at
256 px (2026-12-05, 2 cores, 2 OpenMP threads, ``python bench/figures.py --synth 0 2``, which runs ``mxvision demo
--seed S``): a 5-fold logistic regression on the stored features (stage4_unit2_relu1, random
weights) reaches AUC 0.978 and 0.972, the Xvision head 0.861 and 1.000 on the test split, the
best trivial baseline 1.000 for both seeds (histogram, thumb4). They are not a benchmark.

Everything is drawn from numpy ``Generator`` streams seeded per (seed, class, patient, image), so a
dataset is byte-for-byte reproducible and adding images does not change the existing ones.
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
VARIABILITY = 0.3  # scale of the patient-to-patient jitter (see the module docstring)
NODULE_RADIUS = (18 / 256, 32 / 256)  # fractions of the image size
NODULE_CONTRAST = (80, 120)  # grey levels added at the centre: lung + this ~ soft tissue


def random_anatomy(rng, variability=None):
    """The per-patient shape of the chest: jitter of lungs, heart, ribs and exposure levels.
    ``variability`` scales every jitter (0 gives the same chest for every patient)."""
    variability = VARIABILITY if variability is None else variability

    def around(centre, half):
        return centre + variability * rng.uniform(-half, half, size=np.shape(centre))
    return {
        "lung_scale": around(np.ones(2), 0.08),
        "lung_shift": around(np.zeros((2, 2)), 0.02),
        "heart": tuple(around(np.array(HEART), np.array([0.02, 0.02, 0.015]))),
        "rib_phase": around(0.5, 0.5),
        "rib_spacing": around(0.072, 0.008),
        "levels": tuple(around(np.array([57.0, 150.0, 197.0]), np.array([12.0, 15.0, 17.0]))),
        "body_width": around(0.435, 0.025),
    }


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


def make_radiograph(rng, size=256, anatomy=None):
    """A CXR-like uint8 image ``(size, size)``; ``anatomy`` (from :func:`random_anatomy`) fixes the
    patient so several images of one patient differ only in exposure and noise."""
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
    # exposure, then blur (unsharp film) and quantum noise
    img = img * rng.uniform(0.92, 1.08) + rng.uniform(-8, 8)
    img = cv2.GaussianBlur(img, (0, 0), 0.004 * size + 0.5)
    img += rng.normal(0.0, 4.0, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).round().astype(np.uint8)


def insert_nodule(img, center, radius_px, contrast, rng):
    """A copy of ``img`` (uint8) with a nodule at ``center`` = (x, y) pixels: a projected sphere
    whose brightness is ``contrast * sqrt(1 - r^2/R^2)``, slightly elliptical and soft-edged,
    clipped to uint8. Draws two numbers from ``rng`` (the outline's aspect ratio and angle).

    The one nodule renderer: the synthetic films, the lesion-insertion pairs and the detector's
    training (a nodule per sample) all use it. Only a window around the nodule is computed (about
    0.1 ms instead of 6 ms on a 512 px film); it reaches past the ellipse by twice the blur's
    kernel radius, so the blur sees only zeros beyond it, and the result is bit-identical to
    computing the profile over the whole film (tests/data/test_synth.py keeps that reference).
    """
    h, w = img.shape
    ratio = rng.uniform(0.85, 1.15)  # lobulated, not a perfect circle
    angle = rng.uniform(0, np.pi)
    sigma = max(0.5, 0.08 * radius_px)
    reach = int(np.ceil(1.15 * radius_px + 8 * sigma)) + 2
    x0, y0 = max(0, int(center[0]) - reach), max(0, int(center[1]) - reach)
    x1, y1 = min(w, int(center[0]) + reach + 1), min(h, int(center[1]) + reach + 1)
    out = img.copy()
    if x0 >= x1 or y0 >= y1:  # the nodule lies wholly outside the film
        return out
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xx - center[0], yy - center[1]
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / (radius_px * ratio)
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / (radius_px / ratio)
    profile = cv2.GaussianBlur(np.sqrt(np.clip(1.0 - u * u - v * v, 0, None)), (0, 0), sigma)
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


def write_png(path, img):
    """Encode ``img`` as PNG and write it atomically (a crash never leaves half a file); the one
    PNG writer of the synthetic films and of both members of a lesion-insertion pair."""
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise RuntimeError(f"cv2 could not encode {path}")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(buf.tobytes())


def synthetic_image(seed, label, patient, shot=0, size=256, with_nodule=True):
    """Image ``shot`` of synthetic patient ``patient`` of class ``label`` as in
    :func:`make_synthetic_dataset`; returns ``(image, nodule)`` with nodule ``(x, y, radius,
    contrast)`` or None. ``with_nodule=False`` renders the same film without its nodule."""
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
                           val=0.15, test=0.15):
    """Write ``out_dir/images/{normal,nodule}/*.png`` and ``out_dir/index.csv``; return the CSV
    path.

    Each patient has ``images_per_patient`` images (same anatomy and nodule, new exposure and
    noise), so the patient-grouped split has something to group. The index has path, label,
    patient_id, split, view and, for nodule rows, nodule_x, nodule_y, nodule_radius (pixels).
    Same arguments, same bytes (with the same numpy and OpenCV builds).
    """
    if n_per_class < 1 or images_per_patient < 1:
        raise ValueError("n_per_class and images_per_patient must be at least 1")
    out_dir = os.path.abspath(os.fspath(out_dir))
    records = []
    for label in CLASSES:
        for k in range(n_per_class):
            patient, shot = divmod(k, images_per_patient)
            img, nodule = synthetic_image(seed, label, patient, shot, size)
            rec = {"label": label, "patient_id": f"syn-{label}-{patient:04d}", "view": "PA"}
            if nodule is not None:
                x, y, radius, _ = nodule
                rec.update(nodule_x=f"{x:.1f}", nodule_y=f"{y:.1f}", nodule_radius=f"{radius:.1f}")
            rec["path"] = os.path.join(out_dir, "images", label, f"{rec['patient_id']}_{shot}.png")
            write_png(rec["path"], img)
            records.append(rec)
    columns = ("patient_id", "split", "view", "nodule_x", "nodule_y", "nodule_radius")
    index = assign_splits(Index(records, out_dir, columns=columns, source=out_dir),
                          val=val, test=test, seed=seed)
    return write_index(index, os.path.join(out_dir, "index.csv"))
