"""``mxvision segment`` end to end on real sample films, with the PSPNet's random (seeded) weights.

Random weights make meaningless anatomy but real, film-dependent maps: what is checked is that
every structure's mask is the model's own ``sigmoid > threshold`` placed on the film it came from
(size, centred square, names), that the overlay and the summaries describe those masks, and that
bad inputs give one line.
"""
import csv
import json

import cv2
import mxnet as mx
import numpy as np
import pytest
from scipy.special import expit

from support.cli import one_line_error, run_cli
from mxvision.data.xrv_transforms import load_xray, preprocess
from mxvision.models.xrv import common as xrv_common
from mxvision.models.xrv import weights as xrv_weights
from mxvision.segmentation import load_segmenter, structure_file

STRUCTURES = ["Left Clavicle", "Right Clavicle", "Left Scapula", "Right Scapula", "Left Lung", "Right Lung",
              "Left Hilus Pulmonis", "Right Hilus Pulmonis", "Heart", "Aorta", "Facies Diaphragmatica",
              "Mediastinum", "Weasand", "Spine"]


@pytest.fixture(scope="module")
def films(shared):
    # a wide JPEG (1036 x 885: the model sees its centred 885-pixel square) and a square PNG
    return [str(shared / "data" / "samples" / n) for n in ("16747_3_1.jpg", "00000001_000.png")]


@pytest.fixture(scope="module")
def written(films, tmp_path_factory):
    """One run over both films and an unreadable file: (exit code, stdout, stderr, out folder)."""
    out = tmp_path_factory.mktemp("seg") / "masks"
    bad = out.parent / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    code, stdout, stderr = run_cli("segment", *films, bad, "--out", out, "--weights", "none", "--quiet")
    return code, stdout, stderr, out


def test_one_mask_per_structure_at_the_film_size_and_an_overlay(films, written):
    code, stdout, _, out = written
    assert code == 1  # one film was unreadable
    for path, stem in zip(films, ("16747_3_1", "00000001_000")):
        h, w = load_xray(path).shape[1:]
        folder = out / stem
        assert sorted(p.name for p in folder.iterdir()) == sorted([structure_file(s) for s in STRUCTURES]
                                                                   + ["overlay.png"])
        assert (folder / "Left_Lung.png").is_file() and (folder / "Facies_Diaphragmatica.png").is_file()
        for name in STRUCTURES:
            mask = cv2.imread(str(folder / structure_file(name)), cv2.IMREAD_UNCHANGED)
            assert mask.shape == (h, w) and mask.dtype == np.uint8
            assert set(np.unique(mask)) <= {0, 255}
        picture = cv2.imread(str(folder / "overlay.png"), cv2.IMREAD_UNCHANGED)
        assert picture.shape == (h, w, 3)
        grey = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
        assert np.abs(picture.astype(int) - grey[..., None]).max() > 50  # tinted, not the bare film
        assert "%s\t14 masks + overlay at %dx%d" % (path, w, h) in stdout


def test_masks_are_the_models_sigmoid_over_the_threshold(films, written):
    """Each written mask, brought back to the model's 512 grid, is sigmoid(logit) > 0.5 of the
    model run here on the same film (centred square, no flip or transpose): only the pixels at
    the masks' edges, where resizing decides, may differ."""
    _, _, _, out = written
    net = load_segmenter(weights="none")
    path = films[0]
    film = load_xray(path)
    logits = net(mx.nd.array(preprocess(film, 512)[None])).asnumpy()[0]
    h, w = film.shape[1:]
    side = min(h, w)
    top, left = h // 2 - side // 2, w // 2 - side // 2
    for k, name in enumerate(STRUCTURES):
        mask = cv2.imread(str(out / "16747_3_1" / structure_file(name)), cv2.IMREAD_UNCHANGED) > 0
        assert not mask[:top].any() and not mask[top + side:].any()
        assert not mask[:, :left].any() and not mask[:, left + side:].any()  # outside the square
        on_grid = cv2.resize(mask[top:top + side, left:left + side].astype(np.uint8), (512, 512),
                             interpolation=cv2.INTER_NEAREST) > 0
        expected = expit(logits[k]) > 0.5
        assert np.mean(on_grid != expected) < 0.01, name
    areas = {k: float(v) for k, v in next(csv.DictReader(open(out / "areas.csv"))).items()
             if k in STRUCTURES}
    assert 0.05 < np.mean([0 < a < 1 for a in areas.values()])  # some structures partly covered
    for name, area in areas.items():
        mask = cv2.imread(str(out / "16747_3_1" / structure_file(name)), cv2.IMREAD_UNCHANGED) > 0
        assert area == pytest.approx(mask.sum() / side ** 2, abs=1e-6)


def test_summary_lists_films_structures_and_the_unreadable_one(films, written):
    _, stdout, _, out = written
    summary = json.loads((out / "segmentation.json").read_text())
    assert summary["threshold"] == 0.5 and "RANDOM" in summary["weights"]
    assert [s["name"] for s in summary["structures"]] == STRUCTURES
    assert [f["path"] for f in summary["films"]][:2] == films
    assert summary["films"][2]["path"].endswith("broken.png") and "error" in summary["films"][2]
    rows = list(csv.DictReader(open(out / "areas.csv")))
    assert [r["path"] for r in rows][:2] == films and rows[2]["error"] and not rows[2]["Heart"]
    error_lines = [line for line in stdout.splitlines() if "\tERROR\t" in line]
    assert len(error_lines) == 1 and "broken.png" in error_lines[0]


@pytest.mark.parametrize("argv, fragments", [
    (["--threshold", "1"], ["--threshold 1", "above 0 and below 1"]),
    (["--threshold", "abc"], ["--threshold abc"]),
    (["--weights", "{tmp}/missing.pth"], ["missing.pth"]),
    (["--model", "densenet121-res224-all"], ["not a segmentation model", "chestx_det-pspnet"]),
])
def test_bad_options_give_one_line(films, tmp_path, argv, fragments):
    argv = [a.format(tmp=tmp_path) for a in argv]
    code, _, err = run_cli("segment", films[1], "--out", tmp_path / "out", *argv)
    one_line_error(code, err, *fragments)
    assert code == 2


def test_an_unwritable_out_gives_one_line(films, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for out in (blocker, blocker / "masks"):
        code, _, err = run_cli("segment", films[1], "--out", out, "--weights", "none")
        one_line_error(code, err, str(blocker))
        assert code == 2


def test_an_unreadable_film_with_strict_gives_one_line(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    code, _, err = run_cli("segment", bad, "--out", tmp_path / "out", "--weights", "none", "--strict")
    one_line_error(code, err, "broken.png")
    assert code == 2


_real_fetch = xrv_weights.fetch_weights


def _fetch_no_retry(name, **kwargs):
    kwargs.update(retries=0, timeout=5)
    return _real_fetch(name, **kwargs)


def test_offline_without_weights_says_how_to_fix(films, monkeypatch, tmp_path):
    from support.httpserver import closed_port_url
    monkeypatch.setenv(xrv_common.BASE_URL_ENV, closed_port_url())
    monkeypatch.setenv("MXVISION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(xrv_weights, "fetch_weights", _fetch_no_retry)  # no 15 s of retries
    code, _, err = run_cli("segment", films[1], "--out", tmp_path / "out", "--quiet")
    one_line_error(code, err, "could not download", "pspnet_chestxray_best_model_4.pth", "MXVISION_XRV_BASE_URL",
                   "--weights")
