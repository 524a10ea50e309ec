import csv

import mxnet as mx
import numpy as np
import pytest

from mxvision.errors import BadRun
from mxvision.evaluate import evaluate_run
from mxvision.export import export_model, load_exported
from mxvision.data import transforms
from mxvision.train.finetune import finetune_run
from mxvision.inference import predict
from mxvision.train.loop import load_classifier, load_head, predict_probs


def _params(path):
    return {k: v.asnumpy() for k, v in mx.nd.load(str(path)).items()}


@pytest.fixture(scope="module")
def tuned(small_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned")
    state = finetune_run(small_run, out, stages=1, epochs=2, batch_size=8, ctx="cpu", progress=False)
    return out, state


def test_only_the_last_stage_and_head_change(small_run, tuned):
    out, state = tuned
    assert [r["epoch"] for r in state["history"]] == [1, 2]
    before, _ = load_classifier(small_run, ctx="cpu")
    after, config = load_classifier(out, ctx="cpu")
    assert config["finetune"]["stages"] == 1 and "fine-tuned" in config["features"]["weights"]["description"]
    old = {k.split("_", 1)[1]: v.data().asnumpy() for k, v in before.backbone.collect_params().items()}
    new = {k.split("_", 1)[1]: v.data().asnumpy() for k, v in after.backbone.collect_params().items()}
    assert old.keys() == new.keys()
    changed = {k for k in old if not np.array_equal(old[k], new[k])}
    assert changed and all("stage4" in k for k in changed), sorted(changed)[:5]
    # frozen BatchNorm statistics untouched, trainable ones updated in train mode
    assert any("stage4" in k and "running_mean" in k for k in changed)


def test_finetuned_run_predicts_exports_and_evaluates(tuned, small_store, tmp_path):
    out, _ = tuned
    images = [it["path"] for it in small_store.items[:2]]
    results = predict(out, images, ctx="cpu")
    net, _ = load_classifier(out, ctx="cpu")
    x = mx.nd.array(np.stack([transforms.load_image(p, "imagenet224") for p in images]))
    expected = net(x).asnumpy()
    got = np.array([list(r["probabilities"].values()) for r in results])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    export_model(out, tmp_path / "m" / "tuned", ctx="cpu")
    np.testing.assert_allclose(load_exported(tmp_path / "m" / "tuned")(x).asnumpy(), expected,
                               rtol=1e-4, atol=1e-5)
    report = evaluate_run(out, small_store.path, tmp_path / "eval", ctx="cpu")
    test_items = [it for it in small_store.items if it["split"] == "test"]
    assert report["n"] == len(test_items)
    assert "fine-tuned" in report["weights"], report["weights"]
    # evaluated through the fine-tuned backbone: the scores are the tuned network's on the images,
    # not its head's on the features stored before fine-tuning
    rows = list(csv.DictReader(open(tmp_path / "eval" / "predictions.csv")))
    assert [r["id"] for r in rows] == [str(it["id"]) for it in test_items]
    scores = np.array([float(r["p_nodule"]) for r in rows])
    x = mx.nd.array(np.stack([transforms.load_image(it["path"], "imagenet224") for it in test_items]))
    np.testing.assert_allclose(scores, net(x).asnumpy()[:, 1], rtol=1e-4, atol=1e-5)
    head, _ = load_head(out, ctx="cpu")
    stored, _, ids = small_store.load("test")
    assert list(ids) == [it["id"] for it in test_items]
    unchanged = np.abs(scores - predict_probs(head, stored, mx.cpu())[:, 1]).max()
    assert unchanged > 1e-3, f"scores within {unchanged:.1e} of the head on the pre-fine-tuning features"


def test_finetune_resumes_to_the_same_weights(small_run, tuned, tmp_path):
    out, _ = tuned
    finetune_run(small_run, tmp_path / "r", stages=1, epochs=1, batch_size=8, ctx="cpu", progress=False)
    finetune_run(small_run, tmp_path / "r", stages=1, epochs=2, batch_size=8, ctx="cpu", progress=False)
    for ext in ("params", "backbone"):
        a = _params(out / "checkpoints" / f"epoch-0002.{ext}")
        b = _params(tmp_path / "r" / "checkpoints" / f"epoch-0002.{ext}")
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_finetune_refuses_bad_arguments(small_run, tmp_path):
    with pytest.raises(BadRun, match="other than --run"):
        finetune_run(small_run, small_run, ctx="cpu", progress=False)
    with pytest.raises(Exception, match="stages=9"):
        finetune_run(small_run, tmp_path / "x", stages=9, ctx="cpu", progress=False)
