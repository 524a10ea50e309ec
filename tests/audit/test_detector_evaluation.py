"""Scoring image files with a detector run (score_image_files), called directly: one row per
readable image, the same numbers as scoring the arrays, unreadable files listed, not fatal."""
import csv
import shutil

import numpy as np
import pytest

from mxvision.audit.detector import load_detector, score_images, train_detector
from mxvision.audit.detector_evaluation import score_image_files
from mxvision.data.index import read_index
from mxvision.errors import BadImage, MxvisionError
from mxvision.io.images import read_image
from mxvision.runtime import parse_ctx


@pytest.fixture(scope="module")
def tiny_run(synth_index, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_detector")
    train_detector(synth_index, out, ctx="cpu", progress=False, steps=1, size=64, batch_pairs=2,
                   val_variants=2)
    return out


def test_rows_match_the_arrays_and_bad_files_are_skipped(tiny_run, synth_index, tmp_path):
    paths = read_index(synth_index).paths[:3]
    folder = tmp_path / "films"
    folder.mkdir()
    for p in paths[1:]:
        shutil.copy(p, folder)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "scores.csv"
    result = score_image_files(tiny_run, [paths[0], bad, folder], ctx="cpu", out=out)

    assert [r["id"] for r in result["rows"]] == [str(paths[0])] + sorted(
        str(folder / p.split("/")[-1]) for p in paths[1:])
    assert len(result["skipped"]) == 1 and "bad.png" in result["skipped"][0]
    cpu = parse_ctx("cpu")
    net, config, state = load_detector(tiny_run, ctx=cpu)
    assert result["threshold"] == state.get("threshold")
    hyper = config["hyper"]
    for row in result["rows"]:
        scores, peaks = score_images(net, [read_image(row["id"])], hyper["size"], cpu, hyper["tta"])
        assert np.isclose(row["score"], float(scores[0]), atol=1e-6) and row["peak"] == peaks[0]
    with open(out, newline="", encoding="utf-8") as f:
        written = list(csv.DictReader(f))
    assert [w["id"] for w in written] == [r["id"] for r in result["rows"]]
    assert [int(w["peak_x"]) for w in written] == [r["peak"][0] for r in result["rows"]]


def test_strict_stops_at_a_bad_file_and_no_images_is_an_error(tiny_run, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(BadImage, match="bad.png"):
        score_image_files(tiny_run, [bad], ctx="cpu", strict=True)
    with pytest.raises(MxvisionError, match="no images given"):
        score_image_files(tiny_run, [], ctx="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MxvisionError, match="no images found in"):
        score_image_files(tiny_run, [empty], ctx="cpu")
