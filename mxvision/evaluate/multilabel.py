"""Evaluating a multi-label run (:mod:`mxvision.train.multilabel`): per-label AUC with intervals.

:func:`mxvision.evaluate.evaluate_run` hands a run whose ``config.json`` says ``task:
"multilabel"`` to :func:`evaluate_multilabel`. Each label is scored on the films whose label is
known (a missing label is neither positive nor negative), so every label has its own ``n`` and
``positives``; its AUC comes with a 95% interval by bootstrap over patients and DeLong's
(:func:`mxvision.train.intervals.auc_with_intervals`). ``mean_auc`` is the mean over the labels
that have an AUC (both classes known in the split), the figure the best epoch was chosen by on
validation. ``predictions.csv`` has per label the truth (empty where missing) and ``p_<label>``.
"""
import csv
import math
from pathlib import Path

import numpy as np

from mxvision.errors import BadRun
from mxvision.evaluate.external import AUC_INTERVAL_METHODS, check_overlap, provenance, scored_store
from mxvision.runtime import parse_ctx
from mxvision.train import multilabel
from mxvision.train.intervals import auc_with_intervals
from mxvision.train.loop import load_classifier, load_head, predict_probs
from mxvision.train.runs import BEST, checkpoint_path
from mxvision.utils import atomic_path, json_safe, write_json

#: What must agree between the features a head was trained on and the ones it is scored on.
MUST_MATCH = ("backbone", "cut", "preprocessing", "feature_shape")
METHODS = {
    "auc": "Mann-Whitney (area under the empirical ROC curve), per label on the films whose label "
           "is known",
    **AUC_INTERVAL_METHODS,
    "mean_auc": "mean of the per-label AUCs that exist (both classes known)",
    "missing_labels": "empty, NaN or -1 in the index: left out of that label's figures",
}


def check_store(config, store, labels):
    """Refuse a store whose features are not those the run was trained on (backbone, cut,
    preprocessing, feature shape, weights) or that lacks one of the run's labels."""
    trained = config["features"]
    for key in MUST_MATCH:
        if trained[key] != store.manifest[key]:
            raise BadRun(store.path, f"{key} differs from the features the run was trained on "
                                     f"({trained['features_dir']})")
    if "finetune" not in config and trained["weights"]["sha1"] != store.manifest["weights"]["sha1"]:
        raise BadRun(store.path, "backbone weights differ from the ones the run was trained on")
    missing = [n for n in labels if n not in store.pathologies]
    if missing:
        raise BadRun(store.path, f"has no targets for {', '.join(missing)}, labels the run was "
                                 "trained on; extract from an index with those columns")


def _probabilities(run_dir, config, store, split, items, ctx, epoch):
    """Per-label probabilities of ``items``: from the stored features, or for a fine-tuned run
    (whose backbone changed) from the images through its own backbone."""
    if "finetune" in config:
        from mxvision.train.finetune import image_probs
        net, _ = load_classifier(run_dir, ctx=ctx, softmax=False)
        logits = image_probs(net, items, config["features"]["preprocessing"]["name"], ctx)
        return multilabel.sigmoid(logits).astype(np.float32), [it["id"] for it in items]
    head, _ = load_head(run_dir, ctx=ctx, epoch=epoch)
    x, _, ids = store.load(split)
    return predict_probs(head, x, ctx, sigmoid=True), ids


def label_report(truth, scores, patients, seed=0):
    """One label's figures on the films whose truth is known: n, positives, negatives, n_patients,
    and the AUC with its intervals (NaN and no interval when one class is missing)."""
    known = ~np.isnan(truth)
    y, s = truth[known].astype(int), scores[known]
    groups = [p for p, k in zip(patients, known) if k]
    figures = {"n": int(known.sum()), "positives": int(y.sum()), "negatives": int(len(y) - y.sum()),
               "missing": int((~known).sum()), "n_patients": len(set(groups))}
    if len(np.unique(y)) < 2:
        return dict(figures, auc=float("nan"), ci_bootstrap=None, ci_delong=None, se_delong=None)
    ci = auc_with_intervals(y, s, groups=groups, seed=seed)
    return dict(figures, auc=ci["auc"], ci_bootstrap=ci["ci_bootstrap"], ci_delong=ci["ci_delong"],
                se_delong=ci["se_delong"], n_boot_valid=ci["n_boot_valid"])


def evaluate_multilabel(run_dir, config, state, features=None, out_dir=None, split=None, ctx=None,
                        epoch=None, allow_overlap=False):
    """Score a multi-label run on ``split`` of ``features`` (default: the test split of its own
    store; all of another store, an external validation checked for shared patients and images);
    write ``metrics.json`` and ``predictions.csv`` to ``out_dir`` and return the metrics."""
    run_dir = Path(run_dir)
    labels = list(config["labels"])
    store, trained, trained_dir, external, split = scored_store(config, features, split)
    store.check_complete()
    name = split or "all"
    out_dir = Path(out_dir or run_dir / f"eval-{name}")
    ctx = parse_ctx(ctx)
    check_store(config, store, labels)
    items = [it for it in store.items if split is None or it["split"] == split]
    if not items:
        raise BadRun(store.path, f"no images in split {name!r}")
    overlap = check_overlap(store, trained, trained_dir, items, allow_overlap) if external else None
    probs, ids = _probabilities(run_dir, config, store, split, items, ctx, epoch)
    if not np.isfinite(probs).all():  # finite parameters can still overflow
        params = run_dir / BEST if epoch is None else checkpoint_path(run_dir, epoch, "params")
        raise BadRun(params, f"gives non-finite probabilities (NaN or infinity) on split {name!r}; "
                             "its parameters are corrupt")
    by_id = {it["id"]: it for it in items}
    rows = [by_id[i] for i in ids]
    truth = multilabel.target_matrix(rows, labels, store.pathologies)
    patients = [it["patient_id"] for it in rows]
    per_label = {label: label_report(truth[:, j], probs[:, j], patients)
                 for j, label in enumerate(labels)}
    aucs = [r["auc"] for r in per_label.values() if not math.isnan(r["auc"])]
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "task": multilabel.TASK,
        "labels": labels,
        "n": len(rows),
        "n_patients": len(set(patients)),
        "mean_auc": float(np.mean(aucs)) if aucs else float("nan"),
        "n_labels_with_auc": len(aucs),
        "per_label": per_label,
        **provenance(run_dir, config, state, store, trained_dir, external, name, epoch),
        "predictions_csv": str((out_dir / "predictions.csv").resolve()),
        "methods": METHODS,
    }
    if overlap is not None:
        report["overlap"] = overlap
    write_predictions(out_dir / "predictions.csv", rows, labels, truth, probs)
    report = json_safe(report)
    write_json(out_dir / "metrics.json", report)
    return report


def write_predictions(path, rows, labels, truth, probs):
    """``id, patient_id``, then per label its truth (1, 0, empty when missing), then ``p_<label>``
    (9 significant digits: float32 exactly, so an AUC recomputed from the file is the same)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "patient_id"] + labels + [f"p_{label}" for label in labels])
            for item, t, p in zip(rows, truth, probs):
                writer.writerow([item["id"], item["patient_id"]] +
                                ["" if math.isnan(v) else int(v) for v in t] + [f"{v:.9g}" for v in p])


def report_lines(report):
    """What ``mxvision evaluate`` prints of a multi-label metrics.json body: the mean AUC, then
    one line per label with its counts and both intervals."""
    def interval(ci):
        return "[n/a]" if not ci else f"[{ci[0]:.3f}, {ci[1]:.3f}]"

    mean = "n/a" if report["mean_auc"] is None else f"{report['mean_auc']:.4f}"
    lines = [f"{report['split']} ({report['validation']}): n={report['n']} ({report['n_patients']} "
             f"patients), {len(report['labels'])} labels, mean AUC {mean} over the "
             f"{report['n_labels_with_auc']} with both classes known"]
    for label, r in report["per_label"].items():
        auc = "n/a" if r["auc"] is None else f"{r['auc']:.4f}"
        lines.append(f"  {label}: n={r['n']} ({r['positives']} positive, {r['missing']} missing) AUC {auc} "
                     f"95% CI {interval(r['ci_bootstrap'])} bootstrap over patients, "
                     f"{interval(r['ci_delong'])} DeLong")
    return lines
