import csv

import cv2
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegressionCV
from sklearn.metrics import accuracy_score, confusion_matrix, roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mxvision.audit.shortcuts import image_baseline_features
from mxvision.errors import BadRun
from mxvision.evaluate import evaluate_run
from mxvision.features.extract import extract_features
from mxvision.utils import read_json


def test_metrics_json_agrees_with_sklearn_on_the_predictions(small_run, small_store, tmp_path):
    report = evaluate_run(small_run, small_store.path, tmp_path / "eval", ctx="cpu")
    saved = read_json(tmp_path / "eval" / "metrics.json")
    assert saved == report
    for key in ("accuracy", "auc", "precision", "recall", "f1", "confusion_matrix", "classes", "n"):
        assert key in saved
    rows = list(csv.DictReader(open(tmp_path / "eval" / "predictions.csv")))
    test_items = [it for it in small_store.items if it["split"] == "test"]
    assert saved["n"] == len(rows) == len(test_items)
    classes = saved["classes"]
    y = [classes.index(r["label"]) for r in rows]
    pred = [classes.index(r["predicted"]) for r in rows]
    assert saved["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert saved["confusion_matrix"] == confusion_matrix(y, pred, labels=[0, 1]).tolist()
    assert saved["auc"] == pytest.approx(roc_auc_score(y, [float(r["p_nodule"]) for r in rows]), abs=1e-5)
    assert set(saved["precision"]) == set(classes) == {"normal", "nodule"}
    assert "RANDOM" in saved["weights"] and saved["backbone"] == "resnet18_v2"
    audit = saved["shortcut_audit"]
    assert audit["model_auc"] == saved["auc"] and audit["n_test"] == saved["n"]
    assert set(audit["baselines"]) == {"histogram", "thumb4", "thumb32"}  # a store has no metadata
    for name, expected in _baseline_aucs(small_store).items():
        assert audit["baselines"][name]["auc"] == pytest.approx(expected), name
    best = max(audit["baselines"].values(), key=lambda b: b["auc"])["auc"]
    assert audit["best_baseline_auc"] == best
    assert audit["baselines"][audit["best_baseline"]]["auc"] == best
    assert audit["warn"] == (saved["auc"] - best < audit["margin"]) and audit["message"]
    for png in ("confusion_matrix.png", "roc_curve.png"):
        img = cv2.imread(str(tmp_path / "eval" / png))
        assert img is not None and img.shape[0] > 200 and img.std() > 0


def _baseline_aucs(store):
    """Each image baseline's test AUC by the documented recipe, computed here with sklearn:
    features of the training and test images, standardised L2 logistic regression with C chosen
    by stratified 5-fold (or fewer) CV AUC on the training rows only."""
    items = {s: [it for it in store.items if it["split"] == s] for s in ("train", "test")}
    feats = {s: [image_baseline_features(it["path"]) for it in rows] for s, rows in items.items()}
    y = {s: np.array([it["label_id"] for it in rows]) for s, rows in items.items()}
    folds = int(min(5, np.bincount(y["train"]).min()))
    aucs = {}
    for name in ("histogram", "thumb4", "thumb32"):
        x = {s: np.stack([f[name] for f in feats[s]]) for s in feats}
        model = make_pipeline(StandardScaler(), LogisticRegressionCV(
            Cs=np.logspace(-4, 1, 6), scoring="roc_auc", solver="liblinear",
            cv=StratifiedKFold(folds, shuffle=True, random_state=0))).fit(x["train"], y["train"])
        aucs[name] = roc_auc_score(y["test"], model.predict_proba(x["test"])[:, 1])
    return aucs


def test_features_from_another_backbone_are_refused(small_run, synth_index, tmp_path):
    other = extract_features(synth_index, tmp_path / "other", backbone="resnet18_v2",
                             cut="stage4_unit1_relu1", weights="none", ctx="cpu", progress=False)
    with pytest.raises(BadRun, match="differs"):
        evaluate_run(small_run, other.path, tmp_path / "eval", ctx="cpu")
