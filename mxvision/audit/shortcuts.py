"""Shortcut audit: would a trivial model on the same split do as well as the real one?

A chest X-ray classifier can reach a high AUC without looking at the lungs, when its classes come
from different scanners, hospitals or years. Measured on JSRT: a logistic regression on a 32x32
thumbnail separates nodule from non-nodule films (AUC about 0.8) because the two groups differ in
acquisition. So next to every model figure this module puts the AUC of trivial baselines trained
on the same training split and tested on the same split:

* ``histogram`` - the 32-bin grey-level histogram (exposure, processing, windowing);
* ``thumb4`` - a 4x4 thumbnail (overall brightness layout: collimation, positioning, labels);
* ``thumb32`` - a 32x32 thumbnail (coarse anatomy and acquisition; no nodule survives it);
* ``metadata`` - allowed metadata columns (age, sex, view, ...) when the index has them.

Each is a standardised L2 logistic regression whose strength is picked by cross-validation on the
training split only (``LogisticRegressionCV``, AUC). Images go through the same centred square
crop as the model presets. The audit warns when the model does not beat the best baseline by
``margin`` (default 0.05 AUC): then the model's figure says little about what it sees.

Metadata is guarded against label leaks in how a table was made: a column that is empty for every
image of a class while filled for others (JSRT gives age and sex only for nodule cases) would make
a perfect, meaningless baseline, so it is left out and listed under ``excluded``.
"""
import inspect
import math
from pathlib import Path

import cv2
import numpy as np

from mxvision.train import metrics
from mxvision.data.index import default_classes
from mxvision.errors import BadIndex, BadRun
from mxvision.io.images import read_image
from mxvision.data.transforms import center_crop_resize
from mxvision.utils import read_json, write_json

IMAGE_BASELINES = ("histogram", "thumb4", "thumb32")
BASELINES = IMAGE_BASELINES + ("metadata",)
DEFAULT_MARGIN = 0.05
HIST_BINS = 32
WORK_SIZE = 256  # images are cropped and reduced to this before the baselines' features
# Metadata a model could pick up from the image or the site; never label-derived columns.
METADATA_COLUMNS = ("age", "sex", "gender", "view", "view_position", "patient_age", "patient_sex",
                    "site", "scanner", "manufacturer")


def image_baseline_features(path):
    """The three image baselines' feature vectors of one file: ``{name: 1-D float32}``."""
    img = center_crop_resize(read_image(path), WORK_SIZE)
    hist, _ = np.histogram(img, bins=HIST_BINS, range=(0.0, 1.0))
    return {
        "histogram": (hist / img.size).astype(np.float32),
        "thumb4": cv2.resize(img, (4, 4), interpolation=cv2.INTER_AREA).ravel(),
        "thumb32": cv2.resize(img, (32, 32), interpolation=cv2.INTER_AREA).ravel(),
    }


def _as_items(source):
    """Rows as dicts with path, label, label_id, patient_id, split (+ any extra columns)."""
    from mxvision.features.extract import FeatureStore, load_index

    if isinstance(source, (str, Path)) and (Path(source) / "manifest.json").is_file():
        source = FeatureStore(source)
    if isinstance(source, FeatureStore):
        return [dict(it) for it in source.items], list(source.classes)
    if isinstance(source, (list, tuple)):
        items = [dict(it) for it in source]
        classes = default_classes(it["label"] for it in items)
        for it in items:
            it.setdefault("label_id", classes.index(it["label"]))
        return items, classes
    index = load_index(source)
    items = []
    for rec, lid, pid, split in zip(index.records(), index.label_ids, index.patient_ids, index.splits):
        items.append(dict(rec, label_id=int(lid), patient_id=pid, split=split))
    return items, index.classes


def _numeric(values):
    try:
        return [float(v) if v != "" else math.nan for v in values]
    except ValueError:
        return None


def metadata_features(train, test, columns=METADATA_COLUMNS):
    """Encode the allowed metadata columns: numbers as (value, missing flag), text one-hot.

    Returns ``(X_train, X_test, used, excluded)``; ``excluded`` maps column -> why it is left
    out (absent, constant, or missing for a whole class = a leak of how the table was made).
    """
    used, excluded, blocks_tr, blocks_te = [], {}, [], []
    labels = np.array([it["label_id"] for it in train])
    for col in columns:
        tr = [str(it.get(col, "") or "").strip() for it in train]
        te = [str(it.get(col, "") or "").strip() for it in test]
        if not any(tr):
            if any(col in it for it in train):
                excluded[col] = "empty in the training split"
            continue
        missing = np.array([v == "" for v in tr])
        leak = [c for c in np.unique(labels) if missing[labels == c].all()]
        if missing.any() and leak and not missing.all():
            excluded[col] = "missing for every training image of a class (label leak)"
            continue
        num_tr, num_te = _numeric(tr), _numeric(te)
        if num_tr is not None and num_te is not None:
            a, b = np.array(num_tr), np.array(num_te)
            fill = np.nanmean(a)
            block_tr = np.stack([np.where(np.isnan(a), fill, a), np.isnan(a)], 1)
            block_te = np.stack([np.where(np.isnan(b), fill, b), np.isnan(b)], 1)
        else:
            cats = sorted(set(tr))
            if len(cats) < 2:
                excluded[col] = "constant in the training split"
                continue
            block_tr = np.array([[v == c for c in cats] for v in tr], np.float32)
            block_te = np.array([[v == c for c in cats] for v in te], np.float32)
        if np.ptp(block_tr, axis=0).max() == 0:
            excluded[col] = "constant in the training split"
            continue
        used.append(col)
        blocks_tr.append(block_tr)
        blocks_te.append(block_te)
    if not used:
        return None, None, used, excluded
    return (np.hstack(blocks_tr).astype(np.float32), np.hstack(blocks_te).astype(np.float32),
            used, excluded)


def fit_baseline(x_train, y_train, x_test, y_test, seed=0):
    """Standardised logistic regression, C picked by stratified CV on the training rows only;
    returns ``{"auc", "C", "n_features"}`` (AUC on the test rows)."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    counts = np.bincount(y_train)
    folds = int(min(5, counts[counts > 0].min()))
    if folds >= 2:
        # scikit-learn >= 1.8 prints two FutureWarnings unless both are given (same fit: plain L2)
        newer = "use_legacy_attributes" in inspect.signature(LogisticRegressionCV).parameters
        options = {"l1_ratios": (0.0,), "use_legacy_attributes": False} if newer else {}
        model = LogisticRegressionCV(Cs=np.logspace(-4, 1, 6), scoring="roc_auc", solver="liblinear",
                                     cv=StratifiedKFold(folds, shuffle=True, random_state=seed), **options)
    else:
        model = LogisticRegression(C=1.0, solver="liblinear")
    pipe = make_pipeline(StandardScaler(), model).fit(x_train, y_train)
    probs = np.zeros((len(x_test), int(max(y_train.max(), y_test.max())) + 1))
    probs[:, pipe.classes_] = pipe.predict_proba(x_test)
    c = float(np.atleast_1d(model.C_)[0]) if hasattr(model, "C_") else 1.0
    return {"auc": metrics.auc_score(y_test, probs), "C": c, "n_features": int(x_train.shape[1])}


def shortcut_audit(index_items_or_store, model_auc=None, split="test", train_split="train",
                   margin=DEFAULT_MARGIN, baselines=BASELINES, metadata_columns=METADATA_COLUMNS,
                   seed=0, out=None):
    """Trivial baselines trained on ``train_split`` and scored on ``split``, next to ``model_auc``.

    ``index_items_or_store``: a FeatureStore (or its folder), an Index or index CSV, or a list of
    item dicts (``path, label[, label_id], split`` + metadata columns). A feature store carries no
    metadata columns; pass the index instead to audit them. Returns (and with ``out`` writes as
    JSON) ``{"split", "train_split", "n_train", "n_test", "model_auc", "margin", "baselines":
    {name: {"auc", "C", "n_features"}}, "metadata_used", "metadata_excluded", "best_baseline",
    "best_baseline_auc", "warn", "message"}``; ``warn`` is True when ``model_auc - best <
    margin``.
    """
    items, classes = _as_items(index_items_or_store)
    train = [it for it in items if it.get("split") == train_split]
    test = [it for it in items if it.get("split") == split]
    source = getattr(index_items_or_store, "path", index_items_or_store)
    for name, rows in ((train_split, train), (split, test)):
        if len(rows) == 0:
            raise BadRun(source if isinstance(source, (str, Path)) else "audit",
                         f"no images in split {name!r} to audit")
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise BadIndex("audit", f"unknown baseline(s) {', '.join(unknown)}; known: {', '.join(BASELINES)}")
    y_train = np.array([it["label_id"] for it in train])
    y_test = np.array([it["label_id"] for it in test])
    report = {"split": split, "train_split": train_split, "n_train": len(train), "n_test": len(test),
              "classes": classes, "model_auc": model_auc, "margin": margin, "baselines": {},
              "metadata_used": [], "metadata_excluded": {}}
    if len(np.unique(y_train)) < 2:
        raise BadRun("audit", f"split {train_split!r} has a single class; baselines cannot be trained")
    wanted = [b for b in IMAGE_BASELINES if b in baselines]
    if wanted:
        f_train, f_test = _image_matrices(train, wanted), _image_matrices(test, wanted)
        for b in wanted:
            report["baselines"][b] = fit_baseline(f_train[b], y_train, f_test[b], y_test, seed)
    if "metadata" in baselines:
        x_tr, x_te, used, excluded = metadata_features(train, test, metadata_columns)
        report["metadata_used"], report["metadata_excluded"] = used, excluded
        if used:
            report["baselines"]["metadata"] = fit_baseline(x_tr, y_train, x_te, y_test, seed)
    scored = {k: v["auc"] for k, v in report["baselines"].items() if not math.isnan(v["auc"])}
    best = max(scored, key=scored.get) if scored else None
    report["best_baseline"] = best
    report["best_baseline_auc"] = scored.get(best) if best else None
    report["warn"], report["message"] = _verdict(model_auc, best, scored.get(best), margin, split)
    if out is not None:
        write_json(out, report)
    return report


def run_shortcut_audit(index=None, features=None, metrics=None, model_auc=None, split="test",
                       train_split="train", margin=DEFAULT_MARGIN, cv=0, out=None):
    """The audit of a model's figure from what a user has at hand: an index CSV (keeps metadata
    columns) or a feature store folder, and/or the ``metrics.json`` ``mxvision evaluate`` wrote,
    which gives the model AUC (unless ``model_auc`` is given) and the feature store (unless
    ``index`` or ``features`` is). Returns :func:`shortcut_audit`'s report, with ``cv`` > 0 also
    ``"cross_validated"`` (:func:`cross_validated_baselines` with ``cv`` folds); ``out``: write
    the report there as JSON. Raises BadRun for an unreadable metrics file or no source."""
    source = index or features
    if metrics:
        try:
            evaluated = read_json(metrics)
        except (OSError, ValueError) as err:
            raise BadRun(metrics, f"not a readable metrics.json ({err})") from None
        model_auc = evaluated.get("auc") if model_auc is None else model_auc
        source = source or evaluated.get("features_dir")
    if not source:
        raise BadRun("audit", "give --index CSV, --features DIR or --metrics metrics.json")
    report = shortcut_audit(source, model_auc, split=split, train_split=train_split, margin=margin)
    if cv:
        report["cross_validated"] = cross_validated_baselines(source, folds=cv)
    if out:
        write_json(out, report)
    return report


def _image_matrices(items, wanted):
    rows = [image_baseline_features(it["path"]) for it in items]
    return {b: np.stack([r[b] for r in rows]) for b in wanted}


def cross_validated_baselines(index_items_or_store, folds=5, repeats=3, seed=0,
                              baselines=IMAGE_BASELINES):
    """Image baselines' AUC by patient-grouped, stratified k-fold CV over *all* rows, repeated.

    A small test split gives a noisy baseline AUC (JSRT's has 9 normal films); this pools every
    row for a steadier estimate of how separable the classes are without the finding. Returns
    ``{name: {"auc_mean", "auc_sd", "n"}}`` (spread over the ``folds * repeats`` folds).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    items, _ = _as_items(index_items_or_store)
    y = np.array([it["label_id"] for it in items])
    groups = np.array([it.get("patient_id") or it["path"] for it in items])
    feats = _image_matrices(items, list(baselines))
    out = {}
    for b in baselines:
        aucs = []
        for r in range(repeats):
            cv = StratifiedGroupKFold(folds, shuffle=True, random_state=seed + r)
            for tr, te in cv.split(feats[b], y, groups):
                if len(np.unique(y[te])) == 2:
                    aucs.append(fit_baseline(feats[b][tr], y[tr], feats[b][te], y[te], seed)["auc"])
        out[b] = {"auc_mean": float(np.mean(aucs)), "auc_sd": float(np.std(aucs)), "n": len(items),
                  "folds": len(aucs)}
    return out


def _verdict(model_auc, best, best_auc, margin, split):
    if best is None:
        return False, f"no baseline could be scored on {split!r}"
    line = f"best trivial baseline on {split!r}: {best} AUC {best_auc:.3f}"
    if model_auc is None or (isinstance(model_auc, float) and math.isnan(model_auc)):
        return False, line
    gap = model_auc - best_auc
    if gap < margin:
        return True, (f"WARNING: model AUC {model_auc:.3f} does not beat the {best} baseline "
                      f"({best_auc:.3f}) by {margin:.2f}; the model may use the same acquisition "
                      "shortcut rather than the finding")
    return False, f"model AUC {model_auc:.3f} beats the best trivial baseline ({best}, {best_auc:.3f}) by {gap:.3f}"


def format_audit(report):
    """A few human-readable lines for the CLI."""
    lines = [f"shortcut audit: trained on {report['train_split']!r} (n={report['n_train']}), "
             f"scored on {report['split']!r} (n={report['n_test']})"]
    if report["model_auc"] is not None:
        lines.append(f"  {'model':<10} AUC {report['model_auc']:.3f}")
    for name, r in report["baselines"].items():
        lines.append(f"  {name:<10} AUC {r['auc']:.3f}  ({r['n_features']} features, C={r['C']:g})")
    for col, why in report["metadata_excluded"].items():
        lines.append(f"  metadata column {col!r} left out: {why}")
    lines.append(report["message"])
    return lines
