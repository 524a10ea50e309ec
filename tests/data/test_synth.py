"""The synthetic radiograph generator: plausible, nodules where the index says, reproducible."""
import hashlib
import os

import cv2
import numpy as np
import pytest

from mxvision.data import synth
from mxvision.data.index import read_index
from mxvision.data.splits import check_no_patient_leak, split_counts


def _digests(folder):
    out = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _region(img, frac_x, frac_y, half=0.03):
    s = img.shape[0]
    x0, x1 = int((frac_x - half) * s), int((frac_x + half) * s)
    y0, y1 = int((frac_y - half) * s), int((frac_y + half) * s)
    return float(img[y0:y1, x0:x1].mean())


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return synth.make_synthetic_dataset(out, n_per_class=10, size=128, seed=0, paired=True)


def test_radiograph_looks_like_a_chest_film():
    for seed in range(5):
        img = synth.make_radiograph(np.random.default_rng(seed), size=256)
        assert img.shape == (256, 256) and img.dtype == np.uint8
        corner = _region(img, 0.03, 0.97)  # air beside the body
        lungs = [_region(img, 0.32, 0.45), _region(img, 0.68, 0.40)]
        spine = _region(img, 0.50, 0.45, half=0.01)
        tissue = _region(img, 0.50, 0.90)  # abdomen under the diaphragm
        assert corner < min(lungs) - 15
        assert max(lungs) < tissue - 40 and max(lungs) < spine - 60
        assert img.std() > 20  # not a flat image


def test_radiograph_is_deterministic_per_generator():
    a = synth.make_radiograph(np.random.default_rng(3), size=128)
    b = synth.make_radiograph(np.random.default_rng(3), size=128)
    c = synth.make_radiograph(np.random.default_rng(4), size=128)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_nodule_is_a_projected_sphere():
    img = np.full((128, 128), 50, np.uint8)
    out = synth.insert_nodule(img, (60.0, 70.0), 20.0, 80.0, np.random.default_rng(0))
    assert np.array_equal(img, np.full((128, 128), 50, np.uint8))  # input untouched
    added = out.astype(float) - 50
    assert added[70, 60] == pytest.approx(80, abs=3)
    # brightness falls off as sqrt(1 - r^2/R^2); the outline is elliptical (+-15%), so check the
    # mean over a ring at half the radius, and nothing beyond 1.4 R
    yy, xx = np.mgrid[0:128, 0:128]
    r = np.hypot(xx - 60, yy - 70)
    assert added[(r > 9) & (r < 11)].mean() == pytest.approx(80 * np.sqrt(0.75), abs=6)
    assert added[r > 28].max() == 0
    bright = synth.insert_nodule(np.full((64, 64), 240, np.uint8), (32, 32), 10, 80,
                                 np.random.default_rng(0))
    assert bright.max() == 255  # clipped, not wrapped around


def _whole_film_nodule(img, center, radius_px, contrast, rng):
    """The nodule profile computed over the whole film: what ``insert_nodule`` computed before it
    worked on a window around the nodule, and what its output must stay equal to, bit for bit."""
    h, w = img.shape
    ratio = rng.uniform(0.85, 1.15)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dx, dy = xx - center[0], yy - center[1]
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / (radius_px * ratio)
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / (radius_px / ratio)
    profile = np.sqrt(np.clip(1.0 - u * u - v * v, 0, None))
    profile = cv2.GaussianBlur(profile, (0, 0), max(0.5, 0.08 * radius_px))
    return np.clip(img.astype(np.float32) + contrast * profile, 0, 255).round().astype(np.uint8)


@pytest.mark.parametrize("shape", [(64, 64), (256, 256), (300, 517), (512, 512)])
def test_windowed_nodule_is_bit_identical_to_the_whole_film_profile(shape):
    h, w = shape
    rng = np.random.default_rng(w)
    img = synth.make_radiograph(np.random.default_rng(1), max(shape))[:h, :w].copy()
    for k in range(30):  # tiny to large nodules, anywhere, edges and outside included
        radius = rng.uniform(0.5, 40) * min(shape) / 256
        center = (rng.uniform(-20, w + 20), rng.uniform(-20, h + 20))
        if k % 3 == 0:
            center = (round(center[0]), round(center[1]))
        contrast = rng.uniform(10, 150)
        got = synth.insert_nodule(img, center, radius, contrast, np.random.default_rng(k))
        want = _whole_film_nodule(img, center, radius, contrast, np.random.default_rng(k))
        assert np.array_equal(got, want), (k, center, radius)
    far = synth.insert_nodule(img, (-500.0, 10.0), 5.0, 80.0, np.random.default_rng(0))
    assert np.array_equal(far, img) and far is not img


def test_lung_positions_fall_inside_the_lungs():
    rng = np.random.default_rng(0)
    points = np.array([synth.random_lung_position(rng, 256) for _ in range(300)]) / 256
    inside = np.zeros(len(points), bool)
    for cx, cy, ax, ay in synth.LUNGS:
        dist2 = ((points[:, 0] - cx) / ax) ** 2 + ((points[:, 1] - cy) / ay) ** 2
        inside |= dist2 <= 0.6 ** 2 + 1e-9
    assert inside.all()
    assert (points[:, 0] < 0.5).sum() > 100 and (points[:, 0] > 0.5).sum() > 100  # both lungs
    hx, hy, hr = synth.HEART
    assert (np.hypot(points[:, 0] - hx, points[:, 1] - hy) > hr).all()


def test_dataset_layout_and_index(small_set):
    index = read_index(small_set, check_files=True)
    assert os.path.basename(small_set) == "index.csv"
    assert len(index) == 20 and index.classes == ["normal", "nodule"]
    assert index.label_ids.tolist().count(1) == 10
    assert all(i.startswith(f"images/{lab}/") and i.endswith(".png")
               for i, lab in zip(index.ids, index.labels))
    assert set(index.views) == {"PA"}
    # pairs: each patient has one normal and one nodule film, and the split keeps them together
    assert len(set(index.patient_ids)) == 10
    for pid in set(index.patient_ids):
        assert sorted(lab for p, lab in zip(index.patient_ids, index.labels) if p == pid) == ["nodule", "normal"]
    assert index.column("pair_id") == list(index.patient_ids)
    check_no_patient_leak(index)
    assert set(split_counts(index)) == {"train", "val", "test"}
    for lab, x, r in zip(index.labels, index.column("nodule_x"), index.column("nodule_radius")):
        assert (lab == "nodule") == (x != "") == (r != "")
    img = cv2.imread(index.paths[0], cv2.IMREAD_UNCHANGED)
    assert img.shape == (128, 128) and img.dtype == np.uint8


def test_lesions_are_texture_without_density_where_the_index_says(small_set):
    index = read_index(small_set)
    yy, xx = np.mgrid[0:128, 0:128]
    seen = 0
    for path, lab, pid, x, y, radius in zip(
            index.paths, index.labels, index.patient_ids, index.column("nodule_x"),
            index.column("nodule_y"), index.column("nodule_radius")):
        img = cv2.imread(path, cv2.IMREAD_GRAYSCALE).astype(float)
        pair = int(pid.rsplit("-", 1)[1])
        again, lesion = synth.synthetic_image(0, lab, pair, size=128)
        assert np.array_equal(img, again)  # the file is exactly what the generator draws
        if lab != "nodule":
            assert lesion is None
            continue
        assert lesion[:3] == pytest.approx((float(x), float(y), float(radius)), abs=0.05)
        amplitude = lesion[3]
        plain, _ = synth.synthetic_image(0, lab, pair, size=128, with_nodule=False)
        r = np.hypot(xx - float(x), yy - float(y)) / float(radius)
        added = img - plain
        inside = added[r < 0.5]  # within one sigma of the centre: the envelope is >= e^-1/2
        # speckle of the stated amplitude (clipping at black or white takes a little of it) ...
        assert 0.5 * amplitude < inside.std() < 1.05 * amplitude, path
        # ... and almost no net density: the mean change is small beside the texture (clipping
        # at black in the darkest lungs adds a little; a brightness nodule would add ~ its contrast)
        assert abs(inside.mean()) < 0.35 * inside.std(), path
        assert not added[r > 1.5 + 1 / float(radius)].any(), path  # nothing beyond 3 sigma (+ the index rounding)
        seen += 1
    assert seen == 10


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = synth.make_synthetic_dataset(tmp_path / "a", n_per_class=4, size=96, seed=5, paired=True)
    b = synth.make_synthetic_dataset(tmp_path / "b", n_per_class=4, size=96, seed=5, paired=True)
    c = synth.make_synthetic_dataset(tmp_path / "c", n_per_class=4, size=96, seed=6, paired=True)
    da, db, dc = (_digests(os.path.dirname(p)) for p in (a, b, c))
    assert len(da) == 9 and da == db  # 8 films + the index
    images = [k for k in da if k.endswith(".png")]
    assert all(da[k] != dc[k] for k in images)


def test_more_images_leave_existing_ones_unchanged(tmp_path):
    for paired in (True, False):
        few = synth.make_synthetic_dataset(tmp_path / f"few{paired}", n_per_class=2, size=64, seed=1,
                                           paired=paired)
        more = synth.make_synthetic_dataset(tmp_path / f"more{paired}", n_per_class=3, size=64, seed=1,
                                            paired=paired)
        d_few, d_more = _digests(os.path.dirname(few)), _digests(os.path.dirname(more))
        assert all(d_more[k] == v for k, v in d_few.items() if k.endswith(".png"))


def test_unpaired_films_keep_one_anatomy_per_patient(tmp_path):
    """The unpaired films (the small fixtures of other tests): several images of one patient
    share anatomy, not noise."""
    csv_path = synth.make_synthetic_dataset(tmp_path, n_per_class=2, size=128, seed=0,
                                            images_per_patient=2)
    index = read_index(csv_path)
    first, second = (cv2.imread(p, cv2.IMREAD_GRAYSCALE).astype(float) for p in index.paths[2:4])
    assert index.patient_ids[2] == index.patient_ids[3]
    assert not np.array_equal(first, second)
    other, _ = synth.unpaired_image(0, "nodule", 3, size=128)
    same_patient = np.corrcoef(first.ravel(), second.ravel())[0, 1]
    other_patient = np.corrcoef(first.ravel(), other.astype(float).ravel())[0, 1]
    assert same_patient > other_patient
    with pytest.raises(ValueError, match="images_per_patient"):
        synth.make_synthetic_dataset(tmp_path / "x", n_per_class=2, images_per_patient=2, paired=True)


def _outside_fit_residual(film, reference, keep):
    """Grey-level residual of ``film`` after the best cubic map from ``reference`` over the pixels
    ``keep``: a different exposure (gain, offset, gamma) of the same anatomy leaves only the two
    films' noise; another patient's anatomy leaves much more."""
    x, y = reference[keep].astype(float), film[keep].astype(float)
    return float(np.std(y - np.polyval(np.polyfit(x, y, 3), x)))


def test_a_pair_is_one_anatomy_with_and_without_the_nodule():
    size = 128
    yy, xx = np.mgrid[0:size, 0:size]
    for pair in range(6):
        normal, none = synth.synthetic_image(0, "normal", pair, size)
        nodule_film, nodule = synth.synthetic_image(0, "nodule", pair, size)
        assert none is None
        x, y, radius = nodule[:3]
        dist = np.hypot(xx - x, yy - y)
        # the nodule film against itself rendered without the lesion (same exposure and noise):
        # the difference is the lesion and nothing else (it is cut at 1.5 radii, 3 sigma), texture
        # of the stated amplitude
        plain, _ = synth.synthetic_image(0, "nodule", pair, size, with_nodule=False)
        added = nodule_film.astype(int) - plain
        assert added[dist > 1.5 * radius].max() == 0 == added[dist > 1.5 * radius].min()
        assert added[dist < 0.5 * radius].std() > 0.5 * nodule[3]
        # the pair's normal film has its own exposure and noise but the same anatomy: a grey-level
        # map from the nodule film explains it up to noise, unlike the next patient's nodule film
        keep = dist > 1.5 * radius
        other, _ = synth.synthetic_image(0, "nodule", pair + 1, size)
        same = _outside_fit_residual(normal, nodule_film, keep)
        different = _outside_fit_residual(normal, other, keep)
        assert same < 9 and same < 0.6 * different, (pair, same, different)
        assert not np.array_equal(normal[keep], plain[keep])  # exposure and noise are the film's own


def test_exposure_is_drawn_independently_of_the_label():
    from sklearn.metrics import roc_auc_score

    # a film's mean grey level and contrast come from its exposure; the nodule adds a few grey
    # levels at most, so over 100 pairs neither separates the classes (the old generator: AUC 1)
    films = {label: [synth.synthetic_image(1, label, pair, 64)[0].astype(float) for pair in range(100)]
             for label in synth.CLASSES}
    y = [0] * 100 + [1] * 100
    means = [f.mean() for label in synth.CLASSES for f in films[label]]
    contrasts = [f.std() for label in synth.CLASSES for f in films[label]]
    assert 0.35 < roc_auc_score(y, means) < 0.65
    assert 0.35 < roc_auc_score(y, contrasts) < 0.65
    assert np.std(means[:100]) > 10  # and the exposures do vary: brightness is no constant
