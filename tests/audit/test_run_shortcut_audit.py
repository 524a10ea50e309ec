"""The shortcut audit from what a user has at hand (run_shortcut_audit), called directly: an index,
a feature store or an evaluate metrics.json, with optional cross-validation and a JSON report."""
import json

import pytest

from mxvision.audit.shortcuts import run_shortcut_audit, shortcut_audit
from mxvision.errors import BadRun

FAST = dict(split="val")


def test_metrics_file_gives_the_model_auc_and_the_features(small_store, tmp_path):
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"auc": 0.42, "features_dir": str(small_store.path)}))
    out = tmp_path / "audit.json"
    report = run_shortcut_audit(metrics=metrics, out=out, **FAST)
    direct = shortcut_audit(small_store.path, 0.42, **FAST)
    assert report == direct and report["model_auc"] == 0.42
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    # explicit choices win over the metrics file
    assert run_shortcut_audit(metrics=metrics, model_auc=0.9, **FAST)["model_auc"] == 0.9


def test_index_source_with_cross_validation(synth_index, tmp_path):
    out = tmp_path / "audit.json"
    report = run_shortcut_audit(index=synth_index, cv=2, out=out, **FAST)
    assert report["model_auc"] is None
    assert set(report["cross_validated"]) == {"histogram", "thumb4", "thumb32"}
    assert all(r["n"] == 24 for r in report["cross_validated"].values())
    assert "cross_validated" in json.loads(out.read_text())


def test_no_source_and_unreadable_metrics_are_bad_runs(tmp_path):
    with pytest.raises(BadRun, match="give --index CSV, --features DIR or --metrics"):
        run_shortcut_audit()
    broken = tmp_path / "metrics.json"
    broken.write_text("{not json")
    with pytest.raises(BadRun, match="not a readable metrics.json"):
        run_shortcut_audit(metrics=broken)
    no_store = tmp_path / "m2.json"
    no_store.write_text(json.dumps({"auc": 0.5}))
    with pytest.raises(BadRun, match="give --index CSV"):
        run_shortcut_audit(metrics=no_store)
