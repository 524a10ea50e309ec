"""The one-command demo: synthetic radiographs → features → head → evaluation → exported model.

It needs no downloads and no files. Backbone weights: ImageNet weights when they are already in
the local model store, random (seeded) weights otherwise — and the summary says which, because a
result on random features shows that the pipeline works, not that it finds nodules in real X-rays.
"""
import time
from pathlib import Path

from mxvision.data.synth import make_synthetic_dataset
from mxvision.errors import MxvisionError
from mxvision.evaluate import evaluate_run
from mxvision.export import export_model
from mxvision.features.extract import extract_features
from mxvision.models import store
from mxvision.models import zoo
from mxvision.train.loop import train_head

#: The demo's films: this many pairs (one patient filmed without and with a nodule, see
#: :mod:`mxvision.data.synth`), an eighth of the patients held out for test (20 pairs, 40 films)
#: and 15% of them for validation; the head trains on the other ~230 films. Fewer training films
#: leave random-weight features too little to learn from (80 pairs, a quarter for test, 48
#: training films: test AUC 0.52).
DEMO_PAIRS = 160
DEMO_VAL, DEMO_TEST = 0.15, 0.125
#: Fewest pairs for which the patient-grouped split gives train, val and test a pair each (3
#: leave test empty: tests/test_demo.py checks this).
MIN_PER_CLASS = 4


def demo_weights():
    """``imagenet`` if its file is already cached (no download), else ``none``."""
    return "imagenet" if store.cached_weights_file(zoo.DEFAULT_BACKBONE) else "none"


def run_demo(out_dir="mxvision-demo", n_per_class=DEMO_PAIRS, size=256, seed=0, epochs=20, weights=None,
             ctx=None, progress=True, say=print):
    """Run the whole pipeline on a generated dataset under ``out_dir``; return a summary dict.

    ``n_per_class`` pairs of films (each pair one patient without and with a nodule), split by
    patient (:data:`DEMO_VAL`, :data:`DEMO_TEST`). The summary carries the shortcut audit
    (``"audit"``), which is also printed: every trivial baseline's AUC beside the model's.
    """
    if not (isinstance(n_per_class, int) and n_per_class >= MIN_PER_CLASS):
        raise MxvisionError(f"n_per_class {n_per_class!r}", f"must be at least {MIN_PER_CLASS} pairs, so "
                            "that train, val and test each get a pair (an image of both classes)")
    out = Path(out_dir)
    tic = time.time()
    weights = weights or demo_weights()
    say(f"[1/5] generating {2 * n_per_class} synthetic radiographs, {n_per_class} patients each filmed "
        f"without and with a nodule ({size}px, seed {seed}) in {out / 'data'}")
    index_csv = make_synthetic_dataset(out / "data", n_per_class=n_per_class, size=size, seed=seed,
                                       val=DEMO_VAL, test=DEMO_TEST, paired=True)
    say(f"[2/5] extracting {zoo.DEFAULT_BACKBONE} features at {zoo.DEFAULT_CUT} (weights: {weights})")
    store_ = extract_features(index_csv, out / "features", weights=weights, ctx=ctx,
                              progress=progress, allow_random=False)
    say(f"[3/5] training the Xvision head ({epochs} epochs, SGD lr 0.01, batch 32), then Platt "
        "calibration on the validation films")
    # Random-weight features give near-saturated softmax outputs, so the arg-max of the raw head
    # calls almost every film one class; the calibrator fitted on validation puts the threshold
    # where the validation films say it belongs (train --calibrate platt).
    state = train_head(store_, out / "run", epochs=epochs, ctx=ctx, progress=progress,
                       keep_checkpoints=1, calibrate="platt")  # the demo keeps its disk use small (~0.5 GB)
    say("[4/5] evaluating on the held-out test patients")
    report = evaluate_run(out / "run", out / "features", out / "eval", ctx=ctx)
    say("[5/5] exporting backbone + head as a symbol file pair")
    exported = export_model(out / "run", out / "model" / "xvision", ctx=ctx)
    summary = {
        "weights": store_.manifest["weights"]["description"],
        "best_epoch": state["best_epoch"],
        "test_accuracy": report["accuracy"], "test_auc": report["auc"], "n_test": report["n"],
        "confusion_matrix": report["confusion_matrix"],
        "metrics": str(out / "eval" / "metrics.json"),
        "confusion_matrix_png": report["confusion_matrix_png"],
        "roc_curve_png": report["roc_curve_png"],
        "training_curve_png": str(out / "run" / "training_curve.png"),
        "exported": exported,
        "audit": report.get("shortcut_audit"),
        "seconds": round(time.time() - tic, 1),
    }
    say("")
    say(f"Backbone weights: {summary['weights']}")
    if weights == "none":
        say("  (no pretrained weights were downloaded: these figures show the pipeline works on "
            "synthetic data, not clinical performance)")
    say(f"Test set: {report['n']} images, accuracy {report['accuracy']:.3f}, AUC {report['auc']:.3f}, "
        f"confusion matrix (rows true {report['classes']}): {report['confusion_matrix']}")
    ci = report.get("auc_intervals") or {}
    if ci.get("ci_bootstrap"):
        say("  AUC 95% CI [{:.3f}, {:.3f}] by bootstrap over patients, [{:.3f}, {:.3f}] DeLong; "
            "Brier {:.3f}, ECE {:.3f} (Platt-calibrated on validation)".format(
                *ci["ci_bootstrap"], *ci["ci_delong"], report["calibration_metrics"]["brier"],
                report["calibration_metrics"]["ece"]))
    for line in audit_lines(summary["audit"]):
        say(line)
    say(f"Metrics:           {summary['metrics']}")
    say(f"Confusion matrix:  {summary['confusion_matrix_png']}")
    say(f"ROC curve:         {summary['roc_curve_png']}")
    say(f"Training curve:    {summary['training_curve_png']}")
    say(f"Exported model:    {exported['symbol']} + {exported['params']}")
    say(f"Done in {summary['seconds']} s.")
    return summary


def audit_lines(audit):
    """The shortcut audit as the demo prints it: each trivial baseline's test AUC beside the
    model's and the verdict (:func:`mxvision.audit.shortcuts.format_audit`)."""
    from mxvision.audit.shortcuts import format_audit

    if not audit:
        return ["Shortcut audit: not run"]
    if audit.get("error"):
        return [f"Shortcut audit: could not run ({audit['error']})"]
    lines = format_audit(audit)
    lines[0] = lines[0][0].upper() + lines[0][1:] + f", margin {audit['margin']:.2f}"
    return lines
