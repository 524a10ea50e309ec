"""Evaluate a nodule detector (:mod:`mxvision.audit.detector`) on a lesion-insertion index.

The metrics a reader needs to trust a figure: AUC and paired AUC with 95 % intervals bootstrapped
over *films* (the two versions of a film are not independent), the confusion matrix at the
threshold chosen on val (never on the test films), AUC by nodule contrast and size, and whether the
evidence maximum falls on the nodule.

:func:`score_image_files` applies a detector to image files a user gives (no known nodules).
"""
import csv
import time
from pathlib import Path

import numpy as np
from sklearn import metrics as skm

from mxvision.audit import lesion
from mxvision.runtime import parse_ctx
from mxvision.errors import BadImage, BadIndex
from mxvision.io.images import read_image
from mxvision.audit.detector import load_detector, score_images
from mxvision.data.folder import expand_images
from mxvision.train.metrics import auc_score
from mxvision.utils import atomic_path, write_json


def evaluate_detector(run_dir, pairs, split="test", out_dir=None, ctx=None, params="best", resamples=2000):
    """Score a lesion-insertion index (``mxvision synth``'s; rows of ``split``, or all for None)
    and return the metrics dict: AUC and paired AUC with film-bootstrap 95 % intervals, the
    confusion matrix at the threshold chosen on val, AUC by nodule contrast and radius (thirds of
    the training ranges) and the pointing game. ``out_dir``: also write ``metrics.json`` and
    ``scores.csv`` there."""
    from mxvision.features.extract import load_index

    tic = time.time()
    ctx = parse_ctx(ctx)
    net, config, state = load_detector(run_dir, ctx, params)
    hyper, index = config["hyper"], load_index(pairs)
    rows = [k for k, s in enumerate(index.splits) if split is None or s == split]
    missing = {"pair_id", "nodule_x", "nodule_y", "nodule_radius", "nodule_contrast"} - set(index.columns)
    if missing or not rows:
        raise BadIndex(index.source, f"no column(s) {', '.join(sorted(missing))}; expected the index "
                                     "`mxvision synth` writes" if missing else f"no rows in split {split!r}")
    images = [lesion.to_uint8(read_image(index.paths[k])) for k in rows]
    scores, peaks = score_images(net, images, hyper["size"], ctx, hyper["tta"])
    all_records = index.records()
    recs = [all_records[k] for k in rows]
    labels = np.array([r["label"] == "nodule" for r in recs], int)
    groups = [r["pair_id"] or r["patient_id"] for r in recs]
    try:
        values = {c: [float(r[c]) if y else np.nan for r, y in zip(recs, labels)]
                  for c in ("nodule_x", "nodule_y", "nodule_radius", "nodule_contrast")}
    except ValueError:
        raise BadIndex(index.source, "a nodule row without a readable nodule_x/y/radius/contrast") from None
    nodule = values.get
    scale = [lesion.REFERENCE_SIZE / min(img.shape) for img in images]
    radius = [r * s for r, s in zip(nodule("nodule_radius"), scale)]  # in pixels of a 512 px film
    threshold = state.get("threshold")
    predicted = (scores >= threshold).astype(int) if threshold is not None else None
    hits = [bool(np.hypot(p[0] - x, p[1] - y) <= rad) for p, x, y, rad, lab in
            zip(peaks, nodule("nodule_x"), nodule("nodule_y"), nodule("nodule_radius"), labels) if lab]
    m = {"run": str(Path(run_dir).resolve()), "params": params, "step": state["best_step"] if params == "best"
         else state["last_step"], "pairs": index.source, "split": split or "all", "n_images": len(rows),
         "n_nodule": int(labels.sum()), "n_clean": int((1 - labels).sum()), "n_films": len(set(groups)),
         "auc": auc_score(labels, scores), "paired_auc": lesion.paired_auc_arrays(labels, groups, scores)}
    if resamples:
        m["ci95"] = lesion.film_bootstrap(labels, groups, scores, resamples)
    m["threshold"] = {"value": threshold, "chosen_on": "val-split films (Youden's J), during training"}
    if predicted is not None:
        cm = skm.confusion_matrix(labels, predicted, labels=[0, 1])
        m.update(classes=["normal", "nodule"], confusion_matrix=cm.tolist(),
                 sensitivity=float(cm[1, 1] / max(1, cm[1].sum())),
                 specificity=float(cm[0, 0] / max(1, cm[0].sum())))
    thirds = lambda lo, hi: np.linspace(lo, hi, 4)  # noqa: E731
    m["by_contrast"] = lesion.auc_by_bin(labels, groups, scores, nodule("nodule_contrast"),
                                         thirds(*hyper["contrast"]))
    m["by_radius_512"] = lesion.auc_by_bin(labels, groups, scores, radius, thirds(*hyper["radius"]))
    m["pointing"] = {"hits": int(sum(hits)), "n": len(hits), "hit_rate": float(np.mean(hits)) if hits else None}
    m["seconds"] = round(time.time() - tic, 1)
    if out_dir is not None:
        write_scores(Path(out_dir) / "scores.csv", [index.ids[k] for k in rows], scores, peaks, threshold,
                     labels=[r["label"] for r in recs], groups=groups)
        write_json(Path(out_dir) / "metrics.json", m)
    return m


def score_image_files(run_dir, images, ctx=None, params="best", strict=False, out=None):
    """Nodule score and evidence peak of image files (files or folders of them) with a detector run.

    An unreadable image is skipped and its error kept (``strict``: the first one raises BadImage),
    so one bad file costs its row only. Returns ``{"threshold", "rows": [{"id", "score", "peak"}],
    "skipped": [message]}``: ``threshold`` is the one chosen on val (None if none was), ``peak``
    the (x, y) of the evidence maximum in the film's pixels. ``out``: also write the rows as a
    scores CSV (:func:`write_scores`). Raises BadIndex when ``images`` names no image, or a
    folder without images (``no images found in DIR``)."""
    paths = expand_images(images, require=True)
    ctx = parse_ctx(ctx)
    net, config, state = load_detector(run_dir, ctx=ctx, params=params)
    hyper = config["hyper"]
    rows, skipped = [], []
    for path in paths:
        try:
            img = read_image(path)
        except BadImage as err:
            if strict:
                raise
            skipped.append(str(err))
            continue
        scores, peaks = score_images(net, [img], hyper["size"], ctx, hyper["tta"])
        rows.append({"id": str(path), "score": float(scores[0]), "peak": peaks[0]})
    threshold = state.get("threshold")
    if out:
        write_scores(out, [r["id"] for r in rows], [r["score"] for r in rows],
                     [r["peak"] for r in rows], threshold)
    return {"threshold": threshold, "rows": rows, "skipped": skipped}


def write_scores(path, ids, scores, peaks, threshold=None, labels=None, groups=None):
    """A scores CSV: id, [label, pair_id,] score, nodule (score >= threshold), peak_x, peak_y."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id"] + (["label", "pair_id"] if labels is not None else []) +
                   ["score", "nodule", "peak_x", "peak_y"])
        for k, (image_id, s, p) in enumerate(zip(ids, scores, peaks)):
            w.writerow([image_id] + ([labels[k], groups[k]] if labels is not None else []) +
                       [f"{s:.5f}", "" if threshold is None else int(s >= threshold), p[0], p[1]])
    return Path(path)
