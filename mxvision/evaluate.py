"""Evaluating a trained run on a held-out split: metrics.json, confusion matrix and ROC plots.

Every figure is written with where it came from (feature store, backbone, weights, epoch, split),
because an accuracy without its data and weights means little — and AUC is always reported next to
the confusion matrix.
"""
import csv
import logging
from pathlib import Path

import numpy as np

from mxvision.train import metrics
from mxvision.runtime import parse_ctx
from mxvision.errors import BadRun, MxvisionError
from mxvision.features.store import FeatureStore
from mxvision.train.loop import load_head, predict_probs
from mxvision.train.runs import BEST, checkpoint_path, load_run
from mxvision.utils import atomic_path, write_json

log = logging.getLogger(__name__)

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


def evaluate_run(run_dir, features=None, out_dir=None, split="test", ctx=None, epoch=None,
                 audit=True):
    """Evaluate the run's best head on ``split`` of ``features``; write and return the metrics.

    With ``audit`` the report also carries trivial baselines (intensity histogram, 4x4 and 32x32
    thumbnails) trained on the same split, and warns when the model does not clearly beat them.
    """
    run_dir = Path(run_dir)
    config, state = load_run(run_dir)
    store = FeatureStore(features or config["features"]["features_dir"])
    out_dir = Path(out_dir or run_dir / f"eval-{split}")
    ctx = parse_ctx(ctx)
    if "finetune" in config:
        # The backbone changed: stored features no longer apply, so run the images through it.
        y, probs, ids = _finetuned_probs(run_dir, config, store, split, ctx)
    else:
        _check_compatible(config, store)
        head, _ = load_head(run_dir, ctx=ctx, epoch=epoch)
        x, y, ids = store.load(split)
        probs = predict_probs(head, x, ctx)
    if not np.isfinite(probs).all():  # finite parameters can still overflow
        params = run_dir / BEST if epoch is None else checkpoint_path(run_dir, epoch, "params")
        raise BadRun(params, f"gives non-finite probabilities (NaN or infinity) on split {split!r}; "
                             "its parameters are corrupt")
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = store.classes
    report = metrics.classification_report(y, probs, classes)
    report.update({
        "split": split,
        "epoch": epoch or state["best_epoch"],
        "run_dir": str(run_dir.resolve()),
        "features_dir": str(store.path.resolve()),
        "backbone": store.manifest["backbone"],
        "cut": store.manifest["cut"],
        # a fine-tuned run's backbone is its own, not the one the stored features came from
        "weights": (config["features"]["weights"] if "finetune" in config
                    else store.manifest["weights"])["description"],
        "n_patients": len({store.items[i]["patient_id"] for i in _rows(store, ids)}),
        "confusion_matrix_png": str((out_dir / "confusion_matrix.png").resolve()),
        "roc_curve_png": str((out_dir / "roc_curve.png").resolve()),
    })
    _write_predictions(out_dir / "predictions.csv", ids, y, probs, classes)
    plot_confusion_matrix(report["confusion_matrix"], classes, out_dir / "confusion_matrix.png",
                          title=f"{split}: accuracy {report['accuracy']:.3f}, AUC {report['auc']:.3f}")
    if len(classes) == 2 and len(np.unique(y)) == 2:
        plot_roc_curve(y, probs[:, 1], out_dir / "roc_curve.png", positive=classes[1])
    else:
        report["roc_curve_png"] = None
    if audit:
        report["shortcut_audit"] = _audit(store, report["auc"], split, config)
        if report["shortcut_audit"].get("warn"):
            log.warning("%s", report["shortcut_audit"]["message"])
    write_json(out_dir / "metrics.json", report)
    return report


def _audit(store, model_auc, split, config):
    from mxvision.audit.shortcuts import shortcut_audit
    try:
        return shortcut_audit(store, model_auc, split=split, train_split=config["splits"]["train"])
    except MxvisionError as err:  # e.g. the images moved since extraction: the metrics still stand
        return {"error": str(err), "warn": None}


def _finetuned_probs(run_dir, config, store, split, ctx):
    from mxvision.train.finetune import image_probs
    from mxvision.train.loop import load_classifier

    items = [it for it in store.items if it["split"] == split]
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
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "label", "predicted"] + [f"p_{c}" for c in classes])
            for i, label, p in zip(ids, labels, probs):
                writer.writerow([i, classes[label], classes[int(p.argmax())]] + [f"{v:.6f}" for v in p])


def _figure(figsize):
    """A figure of its own (Agg canvas), not pyplot's: library code must not touch pyplot or
    ``matplotlib.use()``, which would switch a running Jupyter kernel's backend and make the
    notebook's own plots vanish."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path):
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return fig


def plot_confusion_matrix(matrix, classes, path, title=""):
    """The confusion matrix as counts in a labelled grid, like the original Xvision figure.
    Writes the PNG and returns the matplotlib Figure (a notebook displays it as it is)."""
    from sklearn.metrics import ConfusionMatrixDisplay

    fig = _figure((4.5, 4))
    ax = fig.add_subplot()
    ConfusionMatrixDisplay(np.array(matrix), display_labels=classes).plot(ax=ax, cmap="Blues",
                                                                          colorbar=False)
    ax.set_title(title, fontsize=9)
    return _save_png(fig, path)


def plot_roc_curve(labels, scores, path, positive="positive"):
    """The ROC curve with the chance diagonal; writes the PNG and returns the Figure."""
    from sklearn.metrics import RocCurveDisplay

    fig = _figure((4.5, 4))
    ax = fig.add_subplot()
    RocCurveDisplay.from_predictions(labels, scores, name=positive, ax=ax)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    return _save_png(fig, path)
