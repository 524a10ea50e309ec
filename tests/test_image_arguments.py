"""Image arguments mean the same thing to every command.

``predict``, ``classify`` and ``data index folder`` take the same files from a folder (TIFF and
``.dicom`` included, hidden files and non-images left out), and a path that cannot even be
examined -- a 300-character file name -- is reported on its own line while the other images are
still scored, by ``predict`` and ``classify`` alike.
"""
import os

import cv2
import numpy as np
import pytest

from support.cli import run_cli
from support.dicom_builders import dicom_bytes
from mxvision.inference import classify
from mxvision.data.index import read_index
from mxvision.inference import predict

LONG_NAME = "x" * 300 + ".png"
# Sorted as listed; h.bmp is listed and then reported, because mxvision does not read BMP.
IMAGES = ["a.png", "b.TIF", "c.tiff", "d.jpg", "e.JPEG", "f.dcm", "g.dicom", "h.bmp"]


def _film(seed):
    return (np.random.default_rng(seed).random((80, 80)) * 255).astype(np.uint8)


def _encoded(name, seed):
    suffix = os.path.splitext(name)[1].lower()
    if suffix in (".dcm", ".dicom"):
        return dicom_bytes(_film(seed))
    ok, buf = cv2.imencode(suffix, _film(seed))
    assert ok
    return buf.tobytes()


@pytest.fixture(scope="module")
def class_tree(tmp_path_factory):
    """``root/normal`` with one file of every image kind, a hidden image, a text file, a folder."""
    root = tmp_path_factory.mktemp("arguments")
    folder = root / "normal"
    folder.mkdir()
    for k, name in enumerate(IMAGES):
        (folder / name).write_bytes(_encoded(name, k))
    (folder / ".hidden.png").write_bytes(_encoded("x.png", 99))
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "thumbnails").mkdir()
    return root


def _classify(images):
    return classify(images, weights="none", ctx="cpu")  # random weights: nothing to download


def test_predict_classify_and_index_folder_take_the_same_files(class_tree, small_run, tmp_path):
    folder = class_tree / "normal"
    code, _, err = run_cli("data", "index", "folder", "--root", class_tree, "--out", tmp_path / "i.csv")
    assert code == 0, err
    indexed = [os.path.basename(p) for p in read_index(tmp_path / "i.csv").paths]
    for results in (predict(small_run, [folder], ctx="cpu"), _classify([folder])):
        assert [os.path.basename(r["path"]) for r in results] == IMAGES
        assert [os.path.basename(r["path"]) for r in results if "error" in r] == ["h.bmp"]
    assert sorted(indexed) == IMAGES


def test_a_300_character_name_is_reported_and_the_rest_scored(class_tree, small_run, tmp_path):
    too_long, good = tmp_path / LONG_NAME, class_tree / "normal" / "a.png"
    for results in (predict(small_run, [too_long, good], ctx="cpu"), _classify([too_long, good])):
        assert [r["path"] for r in results] == [str(too_long), str(good)]
        assert "File name too long" in results[0]["error"]
        assert "error" not in results[1]
    code, out, err = run_cli("classify", "--weights", "none", "--ctx", "cpu", "--quiet", too_long, good)
    assert code == 1 and "Traceback" not in err, err
    assert out.startswith(f"ERROR\t{too_long}: ") and "File name too long" in out.splitlines()[0]
    assert "a.png" in out.splitlines()[2]  # the table header names the scored image
