"""The lesion-insertion set: lung estimate, nodule placement, paired files and index, the CLI."""
import csv

import cv2
import numpy as np
import pytest

from mxvision.audit import lesion
from mxvision.data import synth
from mxvision.data.index import read_index
from mxvision.data.splits import check_no_patient_leak
from mxvision.errors import BadIndex


def cartoon(seed, size=256):
    rng = np.random.default_rng(seed)
    anatomy = synth.random_anatomy(rng)
    img = synth.make_radiograph(rng, size, anatomy=anatomy)
    truth = np.zeros((size, size), np.uint8)
    for cx, cy, ax, ay in synth.lung_geometry(anatomy):
        cv2.ellipse(truth, (int(cx * size), int(cy * size)), (int(ax * size), int(ay * size)), 0, 0, 360, 1, -1)
    return img, truth.astype(bool)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lung_mask_finds_the_lungs_of_a_cartoon_film(seed):
    img, truth = cartoon(seed)
    mask = lesion.lung_mask(img)
    assert (mask & truth).sum() / mask.sum() > 0.9  # what it calls lung is lung
    assert (mask & truth).sum() / truth.sum() > 0.6  # and it finds most of it
    assert lesion.lung_mask(img.astype(np.float32) / 255).sum() == pytest.approx(mask.sum(), rel=0.02)


def test_lung_mask_contains_the_real_jsrt_nodules(shared):
    with open(shared / "data/jsrt/labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["label"] == "nodule"][:30]
    inside = blank = 0
    for r in rows:
        img = cv2.imread(str(shared / "data/jsrt/images" / r["filename"]), cv2.IMREAD_GRAYSCALE)
        mask = lesion.lung_mask(img)
        if np.ptp(np.percentile(img[51:410, 51:461], (1, 99))) < lesion.MIN_SPREAD:
            blank += 1  # three shared JSRT films are washed out (grey 237-255): nothing to find
            assert not mask.any()
            continue
        assert 0.1 < mask.mean() < 0.45
        inside += mask[int(float(r["nodule_y_512"])), int(float(r["nodule_x_512"]))]
    assert blank < 5 and inside >= 0.7 * (len(rows) - blank)  # measured: 73 of all 93 (0.785)


def test_nodule_lands_inside_the_lung_and_changes_nothing_else():
    img, truth = cartoon(3)
    mask = lesion.lung_mask(img)
    for k in range(5):
        rng = np.random.default_rng(k)
        out, nod = lesion.insert_random_nodule(img, mask, rng, radius=(7, 20), contrast=(30, 40))
        r = nod["radius"]
        assert 3.5 - 1e-6 <= r <= 10 + 1e-6  # 7-20 px at 512 is 3.5-10 px at 256
        assert nod["lung_mask"] == "estimated"
        yy, xx = np.mgrid[:256, :256]
        dist = np.hypot(xx - nod["x"], yy - nod["y"])
        assert mask[dist <= r].all()  # the whole disc lies in the lung estimate
        diff = out.astype(int) - img.astype(int)
        assert (diff >= 0).all() and diff[dist > 1.5 * r + 3].max() == 0
        assert diff[dist <= 1].max() >= 0.6 * nod["contrast"]


def test_empty_lung_estimate_falls_back_to_nominal_geometry():
    blank = np.full((200, 300), 128, np.uint8)
    mask = lesion.lung_mask(blank)
    assert not mask.any()
    x, y, where = lesion.random_position(np.random.default_rng(0), mask, 5)
    assert where == "nominal" and 50 <= x <= 250 and 0 <= y <= 200


def test_pairs_differ_only_by_the_nodule(synth_index, tmp_path):
    src = read_index(synth_index)
    out = lesion.make_lesion_pairs(synth_index, tmp_path / "pairs", variants=2, seed=3, progress=False)
    normals = [i for i, lab in enumerate(src.labels) if lab == "normal"]
    assert len(out) == 3 * len(normals)
    assert sorted(set(out.labels)) == ["nodule", "normal"]
    check_no_patient_leak(out)
    recs = out.records()
    by_pair = {}
    for rec in recs:
        by_pair.setdefault(rec["pair_id"], []).append(rec)
        assert rec["patient_id"] == rec["pair_id"]
    for k in normals:  # the source split is kept
        members = by_pair[src.patient_ids[k]]
        assert {m["split"] for m in members} == {src.splits[k]}
        clean = next(m for m in members if m["label"] == "normal")
        base = cv2.imread(clean["path"], cv2.IMREAD_UNCHANGED)
        assert np.array_equal(base, cv2.imread(src.paths[k], cv2.IMREAD_UNCHANGED))
        for m in members:
            if m["label"] != "nodule":
                continue
            img = cv2.imread(m["path"], cv2.IMREAD_UNCHANGED)
            diff = img.astype(int) - base.astype(int)
            yy, xx = np.nonzero(diff)
            x, y, r = float(m["nodule_x"]), float(m["nodule_y"]), float(m["nodule_radius"])
            assert len(xx) > 0 and np.hypot(xx - x, yy - y).max() <= 1.5 * r + 3
    # reproducible byte for byte, and the written CSV reads back the same
    again = lesion.make_lesion_pairs(synth_index, tmp_path / "again", variants=2, seed=3, progress=False)
    for a, b in zip(out.paths, again.paths):
        assert open(a, "rb").read() == open(b, "rb").read()
    back = read_index(tmp_path / "pairs" / "index.csv")
    assert back.ids == out.ids and back.column("nodule_radius") == out.column("nodule_radius")


def test_split_filter_and_no_normals_error(synth_index, tmp_path):
    out = lesion.make_lesion_pairs(synth_index, tmp_path / "t", splits=["train"], progress=False)
    assert set(out.splits) == {"train"}
    with pytest.raises(BadIndex, match="no 'healthy' images"):
        lesion.make_lesion_pairs(synth_index, tmp_path / "x", label="healthy", progress=False)


def test_paired_auc_compares_each_film_with_its_own_nodule_version(synth_index, tmp_path):
    out = lesion.make_lesion_pairs(synth_index, tmp_path / "p", variants=2, progress=False)
    # nodule versions score 0.1 above their own film, while films differ a lot from each other
    base = {pid: k for k, pid in enumerate(sorted(set(out.patient_ids)))}
    scores = {i: base[p] + (0.1 if lab == "nodule" else 0.0)
              for i, p, lab in zip(out.ids, out.patient_ids, out.labels)}
    value, n = lesion.paired_auc(out, scores)
    assert value == 1.0 and n == 2 * len(base)
    flipped = {i: -s for i, s in scores.items()}
    assert lesion.paired_auc(out, flipped)[0] == 0.0
    assert lesion.paired_auc(out, {})[1] == 0


def test_cli_synth(synth_index, tmp_path, monkeypatch, capsys):
    import mxvision.cli as cli

    code = cli.main(["synth", "--index", str(synth_index), "--out", str(tmp_path / "s"), "--radius", "10",
                     "12", "--contrast", "20", "20", "--quiet"])
    assert code == 0
    assert "index.csv" in capsys.readouterr().out
    radii = [float(r) for r in read_index(tmp_path / "s" / "index.csv").column("nodule_radius") if r]
    assert radii and all(2.5 - 1e-6 <= r <= 3.0 + 1e-6 for r in radii)  # 10-12 px at 512 -> 128 px
    code = cli.main(["synth", "--index", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "z")])
    assert code == 2 and "missing.csv" in capsys.readouterr().err
