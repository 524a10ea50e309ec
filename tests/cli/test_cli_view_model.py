"""``mxvision data index ... --views frontal --view-model WEIGHTS`` on real films.

Real sample films (NIH PNGs and a PadChest JPEG without a view; DICOMs whose header says PA)
and random view-model weights that call one film frontal and the others lateral
(``support.view_model``). Unknown views are predicted, recorded as predicted, known views are
left alone, and ``--views`` then selects on them; a bad ``--view-model`` is one line.
"""
import csv
import os
import shutil

import pytest
from support.cli import one_line_error, run_cli
from support.view_model import split_view_weights

from mxvision.data.index import read_index

RASTER = ["00000001_000.png", "00027426_000.png", "16747_3_1.jpg"]
DICOM = ["Fake_MONOHR1.dcm", "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"]  # PA in the header
SOURCE = "model:xinario-view-resnet50"


@pytest.fixture(scope="module")
def classes(shared, tmp_path_factory):
    """ROOT/normal and ROOT/nodule holding the real sample films, and the split weights."""
    root = tmp_path_factory.mktemp("classes")
    samples = os.path.join(shared, "data", "samples")
    for i, name in enumerate(RASTER + DICOM):
        folder = root / ("normal" if i % 2 else "nodule")
        folder.mkdir(exist_ok=True)
        shutil.copy(os.path.join(samples, name), folder / name)
    raster = sorted(str(p) for p in root.rglob("*") if p.suffix in (".png", ".jpg"))
    weights, frontal = split_view_weights(raster, root / "view.params")
    return root, weights, os.path.basename(frontal)


def _rows(csv_path):
    with open(csv_path, newline="") as f:
        return {os.path.basename(r["path"]): r for r in csv.DictReader(f)}


def test_folder_predicts_unknown_views_and_selects_on_them(classes, tmp_path):
    root, weights, frontal = classes
    out = tmp_path / "all.csv"
    code, text, err = run_cli("data", "index", "folder", "--root", root, "--views", "all",
                              "--view-model", weights, "--out", out)
    assert code == 0, err
    rows = _rows(out)
    assert set(rows) == set(RASTER + DICOM)
    for name in RASTER:  # no view in a PNG/JPEG: predicted, and recorded as such
        assert rows[name]["view"] == ("FRONTAL" if name == frontal else "LATERAL")
        assert rows[name]["view_source"] == SOURCE
    for name in DICOM:  # the header's view is kept, not predicted
        assert rows[name]["view"] == "PA" and rows[name]["view_source"] == ""
    assert "views predicted by xinario-view-resnet50 for films without one: FRONTAL 1, LATERAL 2" in text
    assert read_index(out).columns[4:6] == ("view", "view_source")

    frontal_csv = tmp_path / "frontal.csv"
    code, _, err = run_cli("data", "index", "folder", "--root", root, "--views", "frontal",
                           "--view-model", weights, "--out", frontal_csv)
    assert code == 0, err
    assert set(_rows(frontal_csv)) == {frontal, *DICOM}  # the predicted laterals are dropped
    lateral_csv = tmp_path / "lateral.csv"
    code, _, err = run_cli("data", "index", "folder", "--root", root, "--views", "lateral",
                           "--view-model", weights, "--out", lateral_csv)
    assert code == 0, err
    assert set(_rows(lateral_csv)) == set(RASTER) - {frontal}


def test_without_the_view_model_unknown_films_are_not_frontal(classes, tmp_path):
    root, _, _ = classes
    out = tmp_path / "plain.csv"
    code, _, err = run_cli("data", "index", "folder", "--root", root, "--views", "frontal", "--out", out)
    assert code == 0, err
    rows = _rows(out)
    assert set(rows) == set(DICOM) and "view_source" not in next(iter(rows.values()))


def test_merge_leaves_known_views_and_predicts_the_rest(classes, tmp_path):
    """An index CSV whose views are partly known (one of them LATERAL, for a film the model calls
    frontal): known views are kept whatever the model would say; only the empty ones are predicted."""
    root, weights, frontal = classes
    films = {p.name: str(p) for p in root.rglob("*") if p.suffix in (".png", ".jpg", ".dcm")}
    given = {frontal: "LATERAL", DICOM[0]: "PA"}
    source = tmp_path / "source.csv"
    with open(source, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "patient_id", "view"])
        for i, name in enumerate(sorted(films)):
            writer.writerow([films[name], ("normal", "nodule")[i % 2], "p%d" % i, given.get(name, "")])
    out = tmp_path / "merged.csv"
    code, text, err = run_cli("data", "index", "merge", source, "--views", "frontal",
                              "--view-model", weights, "--out", out)
    assert code == 0, err
    rows = _rows(out)
    # kept: the PA DICOM (known), the other DICOM (unknown in this CSV: the model called it frontal
    # or lateral -- either way recorded); the film given as LATERAL is dropped although the model
    # would call it frontal
    assert frontal not in rows and rows[DICOM[0]]["view"] == "PA" and rows[DICOM[0]]["view_source"] == ""
    assert all(r["view_source"] == SOURCE for n, r in rows.items() if n != DICOM[0])
    assert all(r["view"] in ("PA", "FRONTAL") for r in rows.values())
    assert "views predicted by xinario-view-resnet50" in text


@pytest.mark.parametrize("weights, fragment", [
    ("missing.pt", "no such weights file"),
    ("not_weights.pt", "not a PyTorch weights file"),
])
def test_a_bad_view_model_is_one_line(classes, tmp_path, weights, fragment):
    root, _, _ = classes
    (tmp_path / "not_weights.pt").write_text("path,label\n")
    out = tmp_path / "out.csv"
    code, _, err = run_cli("data", "index", "folder", "--root", root, "--views", "frontal",
                           "--view-model", tmp_path / weights, "--out", out)
    one_line_error(code, err, fragment)
    assert not out.exists()


def test_a_views_typo_fails_before_the_model_loads(classes, tmp_path):
    root, _, _ = classes
    code, _, err = run_cli("data", "index", "folder", "--root", root, "--views", "frontall",
                           "--view-model", tmp_path / "missing.pt", "--out", tmp_path / "out.csv")
    one_line_error(code, err, "frontall")
