"""Evaluating a multi-label run: per-label n, positives, AUC with intervals, mean AUC and
predictions.csv, on real NIH ChestX-ray14 films with their real finding labels.

The index comes from the NIH builder (``task="pathologies"``: the 14 NIH findings 1/0, the four
pathologies NIH does not label empty); on top, Infiltration is made unknown on every third film,
as a reader's "uncertain" would be. Features of a random-weight ResNet-18 (no pretrained weights
can be had here), so the AUCs are near chance: what is checked is that every figure is the one
sklearn computes from the written predictions and the index's truth, not that the model is good.
"""
import csv
import json
import math

import mxnet as mx
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from support.cli import one_line_error, run_cli
from mxvision.data.index import read_index, write_index
from mxvision.data.labels import PATHOLOGIES
from mxvision.errors import BadRun
from mxvision.evaluate import evaluate_run
from mxvision.evaluate.multilabel import report_lines
from mxvision.features.extract import extract_features
from mxvision.inference import predict
from mxvision.train.loop import load_head, train_head

UNCERTAIN = "Infiltration"


@pytest.fixture(scope="module")
def nih_multi(shared, tmp_path_factory):
    from mxvision.data.nih import nih_index

    folder = tmp_path_factory.mktemp("nih_multi")
    nih = shared / "data" / "nih"
    index, _ = nih_index(nih / "Data_Entry_2017_v2020.csv.gz", nih / "images", folder / "all.csv",
                         task="pathologies")
    index = index.select([k % 2 == 0 for k in range(len(index))])  # half the films: quicker
    index = index.with_column(UNCERTAIN, ["" if k % 3 == 0 else v
                                          for k, v in enumerate(index.column(UNCERTAIN))])
    csv_path = write_index(index, folder / "index.csv")
    store = extract_features(csv_path, folder / "features", backbone="resnet18_v2", weights="none",
                             ctx="cpu", batch_size=16, shard_size=64, progress=False)
    run = folder / "run"
    train_head(store, run, epochs=3, batch_size=16, ctx="cpu", progress=False, labels="all",
               keep_checkpoints=0)
    report = evaluate_run(run, out_dir=folder / "eval", ctx="cpu")
    return {"index": read_index(csv_path), "store": store, "run": run, "report": report,
            "eval": folder / "eval"}


def _predictions(eval_dir):
    with open(eval_dir / "predictions.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_all_means_the_pathologies_with_both_classes_in_train(nih_multi):
    config = json.loads((nih_multi["run"] / "config.json").read_text())
    index = nih_multi["index"]
    train = [k for k, s in enumerate(index.splits) if s == "train"]
    trainable = [p for p in PATHOLOGIES if p in index.columns and
                 {index.column(p)[k] for k in train} >= {"0", "1"}]
    assert config["task"] == "multilabel" and config["labels"] == trainable
    assert "Fracture" not in trainable and len(trainable) >= 10  # NIH labels 14, not these four
    assert nih_multi["report"]["labels"] == trainable


def test_per_label_counts_are_those_of_the_index(nih_multi):
    report, index = nih_multi["report"], nih_multi["index"]
    test = [k for k, s in enumerate(index.splits) if s == "test"]
    assert report["n"] == len(test) and report["split"] == "test"
    assert report["n_patients"] == len({index.patient_ids[k] for k in test})
    for label, figures in report["per_label"].items():
        values = [index.column(label)[k] for k in test]
        assert figures["positives"] == values.count("1")
        assert figures["negatives"] == values.count("0")
        assert figures["missing"] == values.count("")
        assert figures["n"] == len(test) - values.count("")
    assert report["per_label"][UNCERTAIN]["missing"] > 0


def test_per_label_auc_matches_sklearn_on_the_written_predictions(nih_multi):
    report, rows = nih_multi["report"], _predictions(nih_multi["eval"])
    index = nih_multi["index"]
    truth_of = dict(zip(index.ids, index.records()))
    aucs = []
    for label, figures in report["per_label"].items():
        known = [r for r in rows if r[label] != ""]
        # missing truth is written empty, exactly where the index has none
        assert all((r[label] == "") == (truth_of[r["id"]][label] == "") for r in rows)
        y = [int(r[label]) for r in known]
        if len(set(y)) < 2:
            assert figures["auc"] is None and figures["ci_delong"] is None
            continue
        auc = roc_auc_score(y, [float(r[f"p_{label}"]) for r in known])
        assert figures["auc"] == pytest.approx(auc, abs=1e-6)
        aucs.append(auc)
        for ci in (figures["ci_bootstrap"], figures["ci_delong"]):
            assert 0 <= ci[0] <= figures["auc"] + 1e-9 and figures["auc"] - 1e-9 <= ci[1] <= 1
        # DeLong's interval is the normal one around the AUC with its standard error (clipped)
        assert figures["ci_delong"][1] == pytest.approx(min(1, auc + 1.959964 * figures["se_delong"]), abs=1e-4)
    assert len(aucs) >= 3
    assert report["mean_auc"] == pytest.approx(np.mean(aucs), abs=1e-9)
    assert report["n_labels_with_auc"] == len(aucs)


def test_the_predictions_are_the_heads_sigmoid_outputs(nih_multi):
    store, rows = nih_multi["store"], _predictions(nih_multi["eval"])
    labels = nih_multi["report"]["labels"]
    head, _ = load_head(nih_multi["run"], ctx="cpu")
    x, _, ids = store.load("test")
    logits = head(mx.nd.array(x)).asnumpy().astype(np.float64)
    expected = 1 / (1 + np.exp(-logits))
    assert [r["id"] for r in rows] == ids
    written = np.array([[float(r[f"p_{label}"]) for label in labels] for r in rows])
    np.testing.assert_allclose(written, expected, atol=2e-6)


def test_metrics_json_carries_the_provenance_and_the_methods(nih_multi):
    saved = json.loads((nih_multi["eval"] / "metrics.json").read_text())
    assert saved == nih_multi["report"]
    for key in ("run_dir", "features_dir", "backbone", "cut", "weights", "epoch", "validation"):
        assert saved[key] not in (None, "")
    assert saved["validation"] == "internal"
    assert "DeLong" in saved["methods"]["auc_ci_delong"] and "patients" in saved["methods"]["auc_ci_bootstrap"]
    best = json.loads((nih_multi["run"] / "state.json").read_text())["best_epoch"]
    assert saved["epoch"] == best


def test_predict_gives_the_evaluations_probabilities_per_label(nih_multi):
    rows = _predictions(nih_multi["eval"])[:4]
    labels = nih_multi["report"]["labels"]
    paths = [str(nih_multi["index"].root + "/" + r["id"]) for r in rows]
    results = predict(nih_multi["run"], paths, ctx="cpu")
    for r, row in zip(results, rows):
        assert list(r["probabilities"]) == labels
        assert [r["probabilities"][label] for label in labels] == \
            pytest.approx([float(row[f"p_{label}"]) for label in labels], abs=1e-4)
        assert r["predicted"] == "|".join(lab for lab in labels if r["probabilities"][lab] >= 0.5)
    code, out, err = run_cli("predict", "--run", nih_multi["run"], "--ctx", "cpu", paths[0])
    assert code == 0, err
    assert all(f"{label}=" in out for label in labels)


def test_a_store_without_the_runs_labels_is_refused(nih_multi, small_store, tmp_path):
    with pytest.raises(BadRun, match="differs from the features the run was trained on|has no targets"):
        evaluate_run(nih_multi["run"], small_store.path, tmp_path / "e", ctx="cpu")


def test_report_lines_name_every_label_with_its_intervals(nih_multi):
    lines = report_lines(nih_multi["report"])
    assert f"mean AUC {nih_multi['report']['mean_auc']:.4f}" in lines[0]
    assert [line.split(":")[0].strip() for line in lines[1:]] == nih_multi["report"]["labels"]
    assert any("DeLong" in line and "bootstrap" in line and "[n/a]" not in line for line in lines[1:])


def test_evaluate_on_the_cli(nih_multi, tmp_path):
    code, out, err = run_cli("evaluate", "--run", nih_multi["run"], "--out", tmp_path / "e", "--ctx", "cpu")
    assert code == 0, err
    assert out.splitlines()[1:1 + len(nih_multi["report"]["labels"])] == report_lines(nih_multi["report"])[1:]
    saved = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert math.isclose(saved["mean_auc"], nih_multi["report"]["mean_auc"])
    code, out, err = run_cli("evaluate", "--run", nih_multi["run"], "--out", tmp_path / "f",
                             "--split", "nonesuch", "--ctx", "cpu")
    one_line_error(code, err, "no images in split 'nonesuch'")
