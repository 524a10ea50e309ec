import json

import mxnet as mx
import numpy as np

from mxvision.data import transforms
from mxvision.export import export_model, load_exported
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
