"""External validation: train on JSRT, evaluate on NIH films indexed separately (issue #18).

Real films from ../shared; a random-weight ResNet-18 v2 trunk keeps it fast. The external index
has no split column, so extraction splits it 70/15/15 -- and evaluation must still score all of it.
"""
import csv
import shutil

import cv2
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from mxvision.cli import main
from mxvision.errors import MxvisionError
from mxvision.evaluate import evaluate_run
from mxvision.features.extract import extract_features
from mxvision.train.loop import train_head
from mxvision.utils import read_json

EXTRACT = dict(backbone="resnet18_v2", weights="none", ctx="cpu", batch_size=16, shard_size=64,
               progress=False)


def _write_index(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "patient_id"])
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def jsrt_run(shared, tmp_path_factory):
    from mxvision.data.jsrt import jsrt_index
    out = tmp_path_factory.mktemp("jsrt")
    index = jsrt_index(shared / "data" / "jsrt", out / "jsrt.csv")
    store = extract_features(index, out / "features", **EXTRACT)
    train_head(store, out / "run", epochs=5, batch_size=16, ctx="cpu", progress=False,
               keep_checkpoints=0)
    return out / "run", store


@pytest.fixture(scope="module")
def nih_store(shared, tmp_path_factory):
    """40 NIH films (20 nodule, 20 normal), indexed with no split column."""
    out = tmp_path_factory.mktemp("nih")
    rows = list(csv.DictReader(open(shared / "data" / "nih" / "labels.csv")))
    picked = ([r for r in rows if r["label"] == "nodule"][:20]
              + [r for r in rows if r["label"] == "normal"][:20])
    index = _write_index(out / "nih.csv", [(str(shared / "data" / "nih" / "images" / r["filename"]),
                                            r["label"], r["patient_id"]) for r in picked])
    return extract_features(index, out / "features", **EXTRACT)


def test_external_store_is_scored_whole_with_intervals_and_calibration(jsrt_run, nih_store, tmp_path):
    run, trained = jsrt_run
    assert {it["split"] for it in nih_store.items} > {"test"}  # extraction split it 70/15/15
    report = evaluate_run(run, nih_store.path, tmp_path / "eval", ctx="cpu")
    saved = read_json(tmp_path / "eval" / "metrics.json")
    assert saved == report
    assert report["validation"] == "external" and report["n"] == len(nih_store.items) == 40
    assert report["features_dir"] == str(nih_store.path.resolve())
    assert report["training_features_dir"] == str(trained.path)
    assert report["overlap"]["training_patients_shared"] == 0
    assert report["overlap"]["training_images_shared"] == 0
    assert report["overlap"]["n_training_images_checked"] == len(trained.items)

    rows = list(csv.DictReader(open(tmp_path / "eval" / "predictions.csv")))
    y = np.array([report["classes"].index(r["label"]) for r in rows])
    p = np.array([float(r["p_nodule"]) for r in rows])
    assert len(rows) == 40 and y.sum() == 20
    auc = report["auc_intervals"]
    assert auc["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-5)
    for key in ("ci_bootstrap", "ci_delong"):
        low, high = auc[key]
        assert low <= report["auc"] <= high and high - low > 0.05, key
    cal = report["calibration_metrics"]
    assert cal["brier"] == pytest.approx(np.mean((p - y) ** 2), abs=1e-5)
    assert 0 <= cal["ece"] <= 1
    png = cv2.imread(report["reliability_diagram_png"])
    assert png is not None and png.std() > 0
    assert "DeLong" in report["methods"]["auc_ci_delong"]


def test_thresholds_are_chosen_on_validation_and_applied_unchanged(jsrt_run, nih_store, tmp_path):
    run, trained = jsrt_run
    report = evaluate_run(run, nih_store.path, tmp_path / "eval", ctx="cpu", sensitivity=0.8)
    internal = evaluate_run(run, None, tmp_path / "val", split="val", ctx="cpu", audit=False)
    rows = list(csv.DictReader(open(tmp_path / "val" / "predictions.csv")))
    y_val = np.array([r["label"] == "nodule" for r in rows], int)
    s_val = np.array([float(r["p_nodule"]) for r in rows])
    assert internal["validation"] == "internal" and len(rows) == trained.count("val")
    fpr, tpr, thresholds = roc_curve(y_val, s_val)
    youden = thresholds[np.argmax(tpr - fpr)]
    points = report["operating_points"]
    assert points["chosen_on"]["n"] == len(rows)
    assert points["youden"]["applied"]["threshold"] == pytest.approx(youden, rel=1e-5)
    target = points["sensitivity_0.8"]
    assert target["on_validation"]["sensitivity"]["value"] >= 0.8
    ext = list(csv.DictReader(open(tmp_path / "eval" / "predictions.csv")))
    y = np.array([r["label"] == "nodule" for r in ext], int)
    s = np.array([float(r["p_nodule"]) for r in ext])
    tp = int(((s >= target["applied"]["threshold"]) & (y == 1)).sum())
    assert target["applied"]["tp"] == tp


def test_a_reextracted_training_index_is_refused_as_overlap(jsrt_run, tmp_path):
    run, trained = jsrt_run
    rows = [(it["path"], it["label"], it["patient_id"]) for it in trained.items[:10]]
    again = extract_features(_write_index(tmp_path / "again.csv", rows), tmp_path / "again", **EXTRACT)
    with pytest.raises(MxvisionError, match=r"10 patient id\(s\) also in the training store .*"
                                            r"10 image\(s\) with the same pixels.*--allow-overlap"):
        evaluate_run(run, again.path, tmp_path / "eval", ctx="cpu")
    report = evaluate_run(run, again.path, tmp_path / "eval", ctx="cpu", allow_overlap=True)
    assert report["n"] == 10 and report["overlap"]["training_patients_shared"] == 10


def test_a_training_film_under_another_name_and_patient_is_refused(jsrt_run, nih_store, tmp_path):
    run, trained = jsrt_run
    copied = tmp_path / "renamed.png"
    shutil.copy(trained.items[3]["path"], copied)
    rows = [(it["path"], it["label"], it["patient_id"]) for it in nih_store.items[:12]]
    rows.append((str(copied), trained.items[3]["label"], "someone-else"))
    store = extract_features(_write_index(tmp_path / "mixed.csv", rows), tmp_path / "mixed", **EXTRACT)
    with pytest.raises(MxvisionError, match=r"1 image\(s\) with the same pixels as a training image "
                                            r"\(e\.g\. 'renamed\.png' = training"):
        evaluate_run(run, store.path, tmp_path / "eval", ctx="cpu")


def test_cli_says_external_and_prints_intervals(jsrt_run, nih_store, tmp_path, capsys):
    run, _ = jsrt_run
    assert main(["evaluate", "--run", str(run), "--features", str(nih_store.path), "--out",
                 str(tmp_path / "eval"), "--no-audit", "--sensitivity", "0.85"]) in (0, None)
    out = capsys.readouterr().out
    assert f"all (external: {nih_store.path.resolve()}" in out and "n=40" in out
    assert "bootstrap over patients" in out and "DeLong" in out and "ECE" in out
    assert "threshold sensitivity_0.85" in out


def test_predictions_csv_holds_the_probabilities_exactly(jsrt_run, nih_store, tmp_path):
    import mxnet as mx
    from mxvision.train.loop import load_head, predict_probs
    run, _ = jsrt_run
    report = evaluate_run(run, nih_store.path, tmp_path / "eval", ctx="cpu", audit=False)
    head, _ = load_head(run, ctx=mx.cpu())
    x, y, ids = nih_store.load(None)
    probs = predict_probs(head, x, mx.cpu())
    rows = {r["id"]: r for r in csv.DictReader(open(tmp_path / "eval" / "predictions.csv"))}
    written = np.array([float(rows[i]["p_nodule"]) for i in ids], np.float32)
    assert np.array_equal(written, probs[:, 1].astype(np.float32))  # float32 survives the text
    assert roc_auc_score(y, written) == report["auc"]  # so `mxvision compare` gets the same AUC
