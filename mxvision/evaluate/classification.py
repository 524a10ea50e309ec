"""Evaluating a trained run on a held-out split: metrics.json, confusion matrix and ROC plots.

Every figure is written with where it came from (feature store, backbone, weights, epoch, split),
because an accuracy without its data and weights means little — and AUC is always reported next to
the confusion matrix.
"""
import csv
import logging
from pathlib import Path

import numpy as np

from mxvision.errors import BadRun, MxvisionError
from mxvision.evaluate.external import AUC_INTERVAL_METHODS, check_overlap, provenance, scored_store
from mxvision.runtime import parse_ctx
from mxvision.train import intervals, metrics, reliability
from mxvision.train.calibrators import calibrate_probs, load_run_calibrator
from mxvision.train.loop import load_head, predict_probs
from mxvision.train.runs import BEST, checkpoint_path, load_run
from mxvision.utils import atomic_path, json_safe, new_figure, save_png, write_json

log = logging.getLogger(__name__)

#: ``--sensitivity``: the target of the second operating point.
DEFAULT_SENSITIVITY = 0.9
# What must agree between the features a head was trained on and the ones it is evaluated on.
_MUST_MATCH = ("backbone", "cut", "preprocessing", "feature_shape", "classes")


def _check_compatible(run_config, store):
    trained = run_config["features"]
    for key in _MUST_MATCH:
        if trained[key] != store.manifest[key]:
            raise BadRun(store.path, f"{key} differs from the features the run was trained on "
                                     f"({trained['features_dir']})")
    if trained["weights"]["sha1"] != store.manifest["weights"]["sha1"]:
        raise BadRun(store.path, "backbone weights differ from the ones the run was trained on")


def evaluate_run(run_dir, features=None, out_dir=None, split=None, ctx=None, epoch=None,
                 audit=True, allow_overlap=False, sensitivity=DEFAULT_SENSITIVITY):
    """Evaluate the run's best head on ``features``; write and return the metrics.

    ``features`` is the store the run was trained on (the default: then ``split`` defaults to
    ``test``) or another one -- an **external** validation: then every image of it is scored
    unless ``split`` selects, after checking that none of its patients and none of its images
    (decoded pixels) occur in the training store; an overlap is refused unless ``allow_overlap``.

    Next to accuracy and the confusion matrix (at the arg-max, as Xvision reported) a binary task
    gets the AUC with a 95% interval by bootstrap over patients and DeLong's, Brier score,
    expected calibration error and a reliability diagram, and two operating points chosen on the
    run's validation split (Youden's J and the threshold reaching ``sensitivity``) applied
    unchanged, with Wilson intervals on sensitivity, specificity, PPV and NPV. A probability
    calibrator fitted by ``train --calibrate`` is applied first. With ``audit`` the report also
    carries trivial baselines (intensity histogram, 4x4 and 32x32 thumbnails) trained on the
    training split, and warns when the model does not clearly beat them.
    """
    run_dir = Path(run_dir)
    config, state = load_run(run_dir)
    if config.get("task") == "multilabel":
        from mxvision.evaluate.multilabel import evaluate_multilabel
        return evaluate_multilabel(run_dir, config, state, features, out_dir, split, ctx, epoch, allow_overlap)
    store, trained, trained_dir, external, split = scored_store(config, features, split)
    name = split or "all"
    out_dir = Path(out_dir or run_dir / f"eval-{name}")
    ctx = parse_ctx(ctx)
    if not 0 < sensitivity < 1:
        raise MxvisionError(f"sensitivity {sensitivity!r}", "must be between 0 and 1 (exclusive)")
    if "finetune" not in config:  # a fine-tuned run reads images, not the stored features
        _check_compatible(config, store)
    items = [store.items[r] for r in _split_rows(store, split)]
    overlap = check_overlap(store, trained, trained_dir, items, allow_overlap) if external else None
    calibrator = load_run_calibrator(run_dir)
    y, probs, ids = _probabilities(run_dir, config, store, split, ctx, epoch, calibrator)
    if not np.isfinite(probs).all():  # finite parameters can still overflow
        params = run_dir / BEST if epoch is None else checkpoint_path(run_dir, epoch, "params")
        raise BadRun(params, f"gives non-finite probabilities (NaN or infinity) on split {name!r}; "
                             "its parameters are corrupt")
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = store.classes
    report = metrics.classification_report(y, probs, classes)
    patients = [store.items[i]["patient_id"] for i in _rows(store, ids)]
    report.update({
        **provenance(run_dir, config, state, store, trained_dir, external, name, epoch),
        "n_patients": len(set(patients)),
        "calibration": calibrator and calibrator["kind"],
        "confusion_matrix_png": str((out_dir / "confusion_matrix.png").resolve()),
        "roc_curve_png": str((out_dir / "roc_curve.png").resolve()),
    })
    if overlap is not None:
        report["overlap"] = overlap
    _write_predictions(out_dir / "predictions.csv", ids, y, probs, classes)
    title = f"{name}: accuracy {report['accuracy']:.3f}, AUC {report['auc']:.3f}"
    plot_confusion_matrix(report["confusion_matrix"], classes, out_dir / "confusion_matrix.png",
                          title=title)
    if len(classes) == 2 and len(np.unique(y)) == 2:
        plot_roc_curve(y, probs[:, 1], out_dir / "roc_curve.png", positive=classes[1])
        report.update(_binary_figures(y, probs[:, 1], patients, out_dir))
        val = _validation_scores(run_dir, config, trained, ctx, epoch, calibrator)
        report["operating_points"] = _operating_points(val, y, probs[:, 1], sensitivity)
    else:
        report["roc_curve_png"] = None
    report["methods"] = METHODS
    if audit:
        report["shortcut_audit"] = _audit(store, items, report["auc"], name, config, external,
                                          trained)
        if report["shortcut_audit"].get("warn"):
            log.warning("%s", report["shortcut_audit"]["message"])
    write_json(out_dir / "metrics.json", json_safe(report))
    return json_safe(report)


#: Where each figure of metrics.json comes from (cited in it).
METHODS = {
    **AUC_INTERVAL_METHODS,
    "proportion_ci": "Wilson score interval (scipy.stats.binomtest proportion_ci)",
    "brier": "mean squared error of the positive-class probability (sklearn brier_score_loss)",
    "ece": "expected calibration error, 10 equal-width bins, weighted by bin size",
    "youden": "threshold maximising sensitivity + specificity - 1 on the validation split",
    "target_sensitivity": "highest threshold reaching the target sensitivity on the validation split",
}
def _split_rows(store, split):
    rows = [k for k, it in enumerate(store.items) if split is None or it["split"] == split]
    if not rows:
        raise BadRun(store.path, f"no images in split {split!r}")
    return rows


def _probabilities(run_dir, config, store, split, ctx, epoch, calibrator):
    """``(label ids, probability matrix, ids)`` of ``split`` of ``store`` (all rows if None)."""
    if "finetune" in config:
        # The backbone changed: stored features no longer apply, so run the images through it.
        y, probs, ids = _finetuned_probs(run_dir, config, store, split, ctx)
    else:
        head, _ = load_head(run_dir, ctx=ctx, epoch=epoch)
        x, y, ids = store.load(split)
        probs = predict_probs(head, x, ctx)
    if calibrator is not None and np.isfinite(probs).all():
        probs = calibrate_probs(calibrator, probs)
    return np.asarray(y), probs, ids


def _validation_scores(run_dir, config, trained, ctx, epoch, calibrator):
    """Labels and positive-class scores of the run's validation split of the training store
    ``trained`` (where operating points are chosen), or None when the store (None: gone) or its
    validation split is not at hand."""
    val = config["splits"].get("val")
    if not val or trained is None or trained.count(val) == 0:
        return None
    y, probs, _ = _probabilities(run_dir, config, trained, val, ctx, epoch, calibrator)
    if len(np.unique(y)) < 2 or not np.isfinite(probs).all():
        return None
    return y, probs[:, 1], val


def _binary_figures(y, scores, patients, out_dir):
    """AUC intervals and calibration of a binary task (and the reliability diagram PNG)."""
    png = out_dir / "reliability_diagram.png"
    reliability.plot_reliability_diagram(y, scores, png)
    return {
        "auc_intervals": intervals.auc_with_intervals(y, scores, groups=patients),
        "calibration_metrics": {
            "brier": reliability.brier_score(y, scores),
            "ece": reliability.expected_calibration_error(y, scores),
            "reliability_curve": reliability.reliability_curve(y, scores),
        },
        "reliability_diagram_png": str(png.resolve()),
    }


def _operating_points(val, y, scores, sensitivity):
    """Thresholds chosen on the validation split, applied unchanged to ``scores``."""
    if val is None:
        return {"note": "no validation split with both classes at hand: no threshold chosen"}
    y_val, s_val, val_split = val
    chosen = {"youden": reliability.youden_threshold(y_val, s_val),
              f"sensitivity_{sensitivity:g}": reliability.sensitivity_threshold(y_val, s_val, sensitivity)}
    out = {"chosen_on": {"split": val_split, "n": int(len(y_val)), "positives": int(np.sum(y_val))}}
    for key, threshold in chosen.items():
        out[key] = {"on_validation": reliability.operating_point(y_val, s_val, threshold),
                    "applied": reliability.operating_point(y, scores, threshold)}
    return out


def _audit(store, items, model_auc, split, config, external, trained):
    from mxvision.audit.shortcuts import shortcut_audit
    train_split = config["splits"]["train"]
    try:
        if not external:
            return shortcut_audit(store, model_auc, split=split, train_split=train_split)
        # Baselines learn on the training films and are scored on the external ones, like the model.
        if trained is None:
            raise BadRun(config["features"]["features_dir"], "the run's training features are gone")
        rows = [dict(it) for it in trained.items if it["split"] == train_split]
        rows += [dict(it, split=split) for it in items]
        return shortcut_audit(rows, model_auc, split=split, train_split=train_split)
    except MxvisionError as err:  # e.g. the images moved since extraction: the metrics still stand
        return {"error": str(err), "warn": None}


def _finetuned_probs(run_dir, config, store, split, ctx):
    from mxvision.train.finetune import image_probs
    from mxvision.train.loop import load_classifier

    items = [it for it in store.items if split is None or it["split"] == split]
    if not items:
        raise BadRun(store.path, f"no images in split {split!r}")
    net, _ = load_classifier(run_dir, ctx=ctx)
    preset = config["features"]["preprocessing"]["name"]
    probs = image_probs(net, items, preset, ctx)
    return np.array([it["label_id"] for it in items]), probs, [it["id"] for it in items]


def _rows(store, ids):
    position = {item["id"]: k for k, item in enumerate(store.items)}
    return [position[i] for i in ids]


def _write_predictions(path, ids, labels, probs, classes):
    # 9 significant digits give float32 back exactly: with fewer, probabilities near 0 or 1 tie
    # in the file, and an AUC recomputed from it (mxvision compare) differs from metrics.json's.
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "label", "predicted"] + [f"p_{c}" for c in classes])
            for i, label, p in zip(ids, labels, probs):
                writer.writerow([i, classes[label], classes[int(p.argmax())]] + [f"{v:.9g}" for v in p])


def plot_confusion_matrix(matrix, classes, path, title=""):
    """The confusion matrix as counts in a labelled grid, like the original Xvision figure.
    Writes the PNG and returns the matplotlib Figure (a notebook displays it as it is)."""
    from sklearn.metrics import ConfusionMatrixDisplay

    fig = new_figure((4.5, 4))
    ax = fig.add_subplot()
    ConfusionMatrixDisplay(np.array(matrix), display_labels=classes).plot(ax=ax, cmap="Blues",
                                                                          colorbar=False)
    ax.set_title(title, fontsize=9)
    return save_png(fig, path)


def plot_roc_curve(labels, scores, path, positive="positive"):
    """The ROC curve with the chance diagonal; writes the PNG and returns the Figure."""
    from sklearn.metrics import RocCurveDisplay

    fig = new_figure((4.5, 4))
    ax = fig.add_subplot()
    RocCurveDisplay.from_predictions(labels, scores, name=positive, ax=ax)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    return save_png(fig, path)
