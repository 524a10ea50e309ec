import json
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

from mxvision.data import transforms
from mxvision.export import export_model, load_exported, load_exported_calibrator
from mxvision.inference import predict
from mxvision.train.loop import load_classifier


def _images(store, n=3):
    return [it["path"] for it in store.items[:n]]


def test_exported_symbol_gives_the_same_probabilities(small_run, small_store, tmp_path):
    paths = export_model(small_run, tmp_path / "model" / "xvision", ctx="cpu")
    assert paths["symbol"].endswith("xvision-symbol.json") and paths["params"].endswith("xvision-0000.params")
    graph = json.load(open(paths["symbol"]))
    names = [node["name"] for node in graph["nodes"]]
    assert "stage4_unit2_relu1" in names  # the literal Xvision cut layer survives export
    meta = json.load(open(paths["meta"]))
    assert meta["classes"] == ["normal", "nodule"] and meta["input_shape"] == [1, 3, 224, 224]
    assert meta["calibration"] is None and load_exported_calibrator(tmp_path / "model" / "xvision") is None

    x = mx.nd.array(np.stack([transforms.load_image(p, "imagenet224") for p in _images(small_store)]))
    python_model, _ = load_classifier(small_run, ctx="cpu")
    expected = python_model(x).asnumpy()
    deployed = load_exported(tmp_path / "model" / "xvision", ctx="cpu")(x).asnumpy()
    np.testing.assert_allclose(deployed, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(deployed.sum(axis=1), 1.0, rtol=1e-5)
    assert not list((tmp_path / "model").glob(".*tmp*"))


def test_predict_matches_the_evaluated_head(small_run, small_store):
    """Predicting from image files reproduces the probabilities computed from stored features."""
    from mxvision.train.loop import load_head, predict_probs
    results = predict(small_run, _images(small_store), ctx="cpu")
    head, _ = load_head(small_run, ctx="cpu")
    x, _, ids = small_store.load()
    probs = predict_probs(head, x[:3], mx.cpu())
    got = np.array([[r["probabilities"]["normal"], r["probabilities"]["nodule"]] for r in results])
    np.testing.assert_allclose(got, probs, rtol=1e-4, atol=1e-5)
    assert [r["predicted"] for r in results] == [["normal", "nodule"][i] for i in probs.argmax(1)]


def test_predict_reports_unreadable_images_without_stopping(small_run, small_store, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    results = predict(small_run, [str(bad)] + _images(small_store, 1), ctx="cpu")
    assert "notes.png" in results[0]["error"]
    assert "probabilities" in results[1]


def test_predict_accepts_a_folder(small_run, synth_index):
    import os
    folder = os.path.join(os.path.dirname(synth_index), "images", "nodule")
    results = predict(small_run, [folder], ctx="cpu")
    assert sorted(r["path"] for r in results) == sorted(os.path.join(folder, f) for f in os.listdir(folder))
    assert all(set(r["probabilities"]) == {"normal", "nodule"} for r in results)


@pytest.fixture(scope="module")
def isotonic_run(small_store, tmp_path_factory):
    from mxvision.train.loop import train_head

    out = tmp_path_factory.mktemp("isotonic-run")
    # lr 0.001: at the default 0.01 this random-feature head saturates to probabilities of 0 and 1
    train_head(small_store, out, epochs=3, batch_size=8, lr=0.001, ctx="cpu", progress=False,
               calibrate="isotonic")
    return out


def test_export_carries_the_runs_calibrator_and_its_loader_gives_predicts_probabilities(isotonic_run, small_store, tmp_path):
    from mxvision.train.calibrators import calibrate_probs

    paths = export_model(isotonic_run, tmp_path / "xvision", ctx="cpu")
    meta = json.load(open(paths["meta"]))
    saved = json.loads((isotonic_run / "calibration.json").read_text())
    assert meta["calibration"] == saved and saved["kind"] == "isotonic"
    assert "calibrated (isotonic)" in meta["output"]
    calibrator = load_exported_calibrator(tmp_path / "xvision")
    assert calibrator == saved
    images = _images(small_store, 6)
    x = mx.nd.array(np.stack([transforms.load_image(p, "imagenet224") for p in images]))
    raw = load_exported(tmp_path / "xvision", ctx="cpu")(x).asnumpy()
    deployed = calibrate_probs(calibrator, raw)
    offline = np.array([list(r["probabilities"].values()) for r in predict(isotonic_run, images, ctx="cpu")])
    # the exported graph and predict's network differ by float32 rounding (within 1e-5, the test
    # above); the isotonic map multiplies a difference by at most its steepest slope
    x, y = np.array(saved["x_thresholds"]), np.array(saved["y_thresholds"])
    slope = max(1.0, float(np.max(np.diff(y) / np.maximum(np.diff(x), 1e-12), initial=0.0)))
    np.testing.assert_allclose(deployed, offline, atol=1e-5 * slope)
    # the isotonic map written out: np.interp over the thresholds of calibration.json
    np.testing.assert_allclose(offline[:, 1], np.interp(raw[:, 1], x, y), atol=1e-5 * slope)
    assert np.abs(offline - raw).max() > 1e-3  # the calibrator changed the probabilities


def test_an_exported_calibrator_edited_afterwards_is_refused_in_one_line(isotonic_run, tmp_path):
    from mxvision.errors import BadRun

    paths = export_model(isotonic_run, tmp_path / "xvision", ctx="cpu")
    meta = json.load(open(paths["meta"]))
    meta["calibration"]["y_thresholds"] = [2.0] * len(meta["calibration"]["y_thresholds"])
    Path(paths["meta"]).write_text(json.dumps(meta))
    with pytest.raises(BadRun, match="xvision-meta.json.*not a valid calibrator"):
        load_exported_calibrator(tmp_path / "xvision")
