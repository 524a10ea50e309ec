"""Shortcut audit: trivial baselines find a planted acquisition shortcut, and only then warn."""
import json

import numpy as np
import pytest

from mxvision.audit import shortcuts as audit
from mxvision.data import synth
from mxvision.data.index import Index, write_index
from mxvision.data.splits import assign_splits
from mxvision.errors import BadRun


def films(tmp_path, shortcut, n=48, seed=0):
    """Cartoon films, half labelled nodule. With ``shortcut`` the nodule films come from a
    'different scanner' (brighter exposure); without, labels are independent of the pixels."""
    rng = np.random.default_rng(seed)
    labels = np.array(["normal", "nodule"] * (n // 2))
    rng.shuffle(labels)
    records = []
    for k, label in enumerate(labels):
        img = synth.make_radiograph(np.random.default_rng([seed, k]), 96).astype(np.int16)
        if shortcut and label == "nodule":
            img = img + 30
        path = tmp_path / f"img{k:03d}.png"
        synth.write_png(str(path), np.clip(img, 0, 255).astype(np.uint8))
        records.append({"path": str(path), "label": str(label), "patient_id": f"p{k}",
                        "age": str(40 + k % 30)})
    index = assign_splits(Index(records, tmp_path, columns=("patient_id", "split", "age")), seed=seed)
    return write_index(index, tmp_path / "index.csv")


def test_planted_shortcut_is_found_and_warned_about(tmp_path):
    csv_path = films(tmp_path, shortcut=True)
    report = audit.shortcut_audit(csv_path, model_auc=0.85, split="test")
    assert set(report["baselines"]) == {"histogram", "thumb4", "thumb32", "metadata"}
    assert report["baselines"]["histogram"]["auc"] > 0.95
    assert report["warn"] and "WARNING" in report["message"]
    assert report["metadata_used"] == ["age"]
    assert report["n_train"] + report["n_test"] < 48  # val rows are neither
    ok = audit.shortcut_audit(csv_path, model_auc=1.0 + audit.DEFAULT_MARGIN, split="test")
    assert not ok["warn"] and "beats" in ok["message"]


def test_no_shortcut_means_chance_level_baselines_and_no_warning(tmp_path):
    csv_path = films(tmp_path, shortcut=False)
    report = audit.shortcut_audit(csv_path, model_auc=0.95, baselines=audit.IMAGE_BASELINES,
                                  out=tmp_path / "audit.json")
    assert report["best_baseline_auc"] < 0.8
    assert not report["warn"]
    assert json.loads((tmp_path / "audit.json").read_text())["best_baseline"] == report["best_baseline"]
    cv = audit.cross_validated_baselines(csv_path, folds=3, repeats=1, baselines=("histogram",))
    assert cv["histogram"]["auc_mean"] < 0.75 and cv["histogram"]["folds"] == 3


def test_cross_validation_sees_the_shortcut(tmp_path):
    cv = audit.cross_validated_baselines(films(tmp_path, shortcut=True), folds=3, repeats=1,
                                         baselines=("thumb4",))
    assert cv["thumb4"]["auc_mean"] > 0.9


def items_with_metadata(n=60, seed=0):
    rng = np.random.default_rng(seed)
    items = []
    for k in range(n):
        label = k % 2
        items.append({"path": f"/nowhere/{k}.png", "label": ["normal", "nodule"][label],
                      "split": "test" if k % 5 == 0 else "train",
                      "age": f"{50 + 15 * label + rng.normal(0, 5):.0f}",
                      "sex": "" if label == 0 else rng.choice(["F", "M"]),  # JSRT-style leak
                      "view": "PA"})
    return items


def test_metadata_used_when_real_and_left_out_when_it_leaks_the_label():
    report = audit.shortcut_audit(items_with_metadata(), model_auc=0.9, baselines=("metadata",))
    assert report["metadata_used"] == ["age"]
    assert "label leak" in report["metadata_excluded"]["sex"]
    assert "constant" in report["metadata_excluded"]["view"]
    assert report["classes"] == ["normal", "nodule"]
    assert report["baselines"]["metadata"]["auc"] > 0.9 and report["warn"]


def test_feature_store_source_and_errors(small_store):
    report = audit.shortcut_audit(small_store, model_auc=0.5, split="val",
                                  baselines=("histogram", "thumb4"))
    assert report["n_test"] == sum(it["split"] == "val" for it in small_store.items)
    assert report["metadata_used"] == []
    with pytest.raises(BadRun, match="no images in split 'holdout'"):
        audit.shortcut_audit(small_store, split="holdout")
    with pytest.raises(audit.BadIndex, match="unknown baseline"):
        audit.shortcut_audit(small_store, baselines=("thumb8",))


def test_cli_audit_reads_a_metrics_file(small_store, tmp_path, monkeypatch, capsys):
    import mxvision.cli as cli

    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"auc": 0.42, "features_dir": str(small_store.path)}))
    out = tmp_path / "audit.json"
    assert cli.main(["audit", "--metrics", str(metrics), "--split", "val", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "model      AUC 0.420" in printed and "thumb32" in printed
    assert json.loads(out.read_text())["model_auc"] == 0.42
    metrics.write_text("{not json")
    assert cli.main(["audit", "--metrics", str(metrics)]) == 2
    assert "metrics.json" in capsys.readouterr().err
