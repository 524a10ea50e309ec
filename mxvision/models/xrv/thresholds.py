"""Recomputing torchxrayvision's operating points on local films, and the JSON the models load.

torchxrayvision calibrates every output with a per-pathology threshold ``op_threshs`` (the sigmoid
value :func:`~mxvision.models.xrv.common.op_norm` maps to 0.5) and publishes, for some weights, a
second threshold ``ppv80_thres``. Both were computed by its ``scripts/model_calibrate.py`` on a
held-out 20% of the training sources, from the *uncalibrated* sigmoid outputs:

* ``op_thresh``: sklearn's ``roc_curve``, the threshold at ``argmax(tpr - fpr)`` -- the ROC point
  of largest Youden's J (sensitivity + specificity - 1); the first maximum, i.e. the highest such
  threshold, when several tie;
* ``ppv80_thresh``: sklearn's ``precision_recall_curve``, ``i`` = the first (lowest-threshold)
  point whose precision exceeds 0.8, and the threshold ``thresholds[i - 1]`` -- one step *below*
  that point, so the PPV measured at it can be just under 0.8 (torchxrayvision's indexing, kept so
  the figures compare with its published ones; the measured PPV is reported beside it). When the
  lowest threshold already has PPV > 0.8, torchxrayvision's ``[i - 1]`` would wrap to the highest
  threshold; here it is the lowest.

A threshold fitted on a handful of positives is noise, so :func:`fit_thresholds` refuses (leaves
null, with the reason) every pathology with fewer than ``min_positives`` positive films
(default :data:`DEFAULT_MIN_POSITIVES`) and every one no ROC point separates better than chance.
The thresholds file records the model, the weights' sha1, the index, the date and the method;
:func:`load_thresholds` reads it strictly, since it may come from anyone.
"""
import datetime
import json
import math
import os

import numpy as np

from mxvision.errors import WeightsError, one_line
from mxvision.utils import file_digest, json_safe
from mxvision.models.xrv.common import DEFAULT_PATHOLOGIES

__all__ = ["DEFAULT_MIN_POSITIVES", "PPV_TARGET", "FORMAT", "youden_threshold", "ppv_threshold",
           "fit_thresholds", "thresholds_document", "load_thresholds", "merged_op_threshs",
           "METHOD"]

#: Fewest positive films a threshold is fitted on (fewer: null, with the reason).
DEFAULT_MIN_POSITIVES = 10
#: The precision torchxrayvision's second operating point aims at.
PPV_TARGET = 0.8
FORMAT = "mxvision-xrv-thresholds"
VERSION = 1
#: Largest thresholds file read: 18 entries take about 8 KB; anything far bigger is not one.
MAX_BYTES = 1 << 20
METHOD = {
    "scores": "uncalibrated sigmoid outputs of the model (op_threshs not applied)",
    "op_thresh": "sklearn.metrics.roc_curve; threshold at argmax(tpr - fpr) (Youden's J), the highest "
                 "on ties -- as torchxrayvision scripts/model_calibrate.py",
    "ppv80_thresh": "sklearn.metrics.precision_recall_curve; i = first point with precision > 0.8, "
                    "threshold thresholds[i - 1] (thresholds[0] when i = 0) -- as torchxrayvision "
                    "scripts/model_calibrate.py",
    "auc": "ROC AUC of the sigmoid outputs on the films with a label for the pathology",
    "calibration": "op_norm: p < t -> p / (2t), else 1 - (1 - p) / (2 (1 - t)); t maps to 0.5",
}


def youden_threshold(targets, probs):
    """``(threshold, j)``: torchxrayvision's op_thresh (the ROC point of largest tpr - fpr) and its J."""
    from sklearn.metrics import roc_curve  # sklearn only when fitting: the CLI imports this module
    fpr, tpr, thresholds = roc_curve(targets, probs)
    j = tpr - fpr
    best = int(np.argmax(j))
    return float(thresholds[best]), float(j[best])


def ppv_threshold(targets, probs, target=PPV_TARGET):
    """torchxrayvision's PPV threshold (see the module docstring for its indexing)."""
    from sklearn.metrics import precision_recall_curve
    precision, _, thresholds = precision_recall_curve(targets, probs)
    above = np.flatnonzero(precision > target)  # never empty: the curve ends at precision 1
    first = int(above[0])
    return float(thresholds[max(first - 1, 0)])


def _rates(targets, probs, threshold):
    """Sensitivity, specificity and PPV of ``probs >= threshold``."""
    called = probs >= threshold
    pos = targets == 1
    tp, fp = int(np.sum(called & pos)), int(np.sum(called & ~pos))
    sens = tp / max(int(pos.sum()), 1)
    spec = 1.0 - fp / max(int((~pos).sum()), 1)
    return {"sensitivity": sens, "specificity": spec, "ppv": tp / (tp + fp) if tp + fp else None}


def default_auc(targets, probs, groups=None):
    from sklearn.metrics import roc_auc_score
    return {"auc": float(roc_auc_score(targets, probs))}


def fit_thresholds(targets, probs, pathologies, untrained=(), min_positives=DEFAULT_MIN_POSITIVES,
                   auc=default_auc, groups=None):
    """Per pathology: n, positives, AUC, op_thresh and ppv80_thresh (or null and ``refused``).

    ``targets``: (N, len(pathologies)) of 1/0/NaN (NaN: no label, the film does not count);
    ``probs``: (N, 18) sigmoid outputs in :data:`DEFAULT_PATHOLOGIES` order; ``untrained``:
    pathology names the weights give no output for. ``auc(targets, probs, groups)`` returns a
    dict holding at least ``"auc"`` (its other keys, e.g. intervals, are kept); ``groups``: one
    patient id per film, for an interval that resamples patients.
    """
    targets = np.asarray(targets, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    out = {}
    for j, name in enumerate(pathologies):
        if name not in DEFAULT_PATHOLOGIES:
            continue
        labelled = ~np.isnan(targets[:, j])
        y = targets[labelled, j].astype(int)
        p = probs[labelled, DEFAULT_PATHOLOGIES.index(name)]
        n, pos = int(y.size), int(y.sum())
        entry = {"n": n, "positives": pos, "op_thresh": None, "ppv80_thresh": None, "refused": None}
        if n == 0:
            entry["refused"] = "no film has a label for it"
        elif name in untrained:
            entry["refused"] = "these weights have no trained output for it"
        elif pos == 0 or pos == n:
            entry["refused"] = "needs positive and negative films (%d of %d positive)" % (pos, n)
        else:
            entry.update(auc(y, p, None if groups is None else np.asarray(groups)[labelled]))
            if pos < min_positives:
                entry["refused"] = "only %d positive film%s (minimum %d)" % (pos, "" if pos == 1 else "s",
                                                                            min_positives)
            else:
                threshold, j_best = youden_threshold(y, p)
                if not (j_best > 0 and math.isfinite(threshold)):
                    entry["refused"] = "no ROC point better than chance (max tpr - fpr = %.3g)" % j_best
                elif not 0.0 < threshold < 1.0:  # float32 sigmoids saturate; op_norm divides by 1 - t
                    entry["refused"] = ("the best ROC point is at the saturated output %g, where op_norm "
                                        "is undefined" % threshold)
                else:
                    entry["op_thresh"] = threshold
                    entry["youden_j"] = j_best
                    entry["at_op_thresh"] = _rates(y, p, threshold)
                    entry["ppv80_thresh"] = ppv_threshold(y, p)
                    entry["at_ppv80_thresh"] = _rates(y, p, entry["ppv80_thresh"])
        out[name] = entry
    return out


def thresholds_document(model, weights_info, index, entries, min_positives, n_images, failed,
                        auc_method=None):
    """The thresholds JSON as a dict (``weights_info``: the model's ``weights_info``)."""
    method = dict(METHOD)
    if auc_method:
        method["auc"] = auc_method
    # strict JSON (no NaN/Infinity): load_thresholds refuses those
    return json_safe({
        "format": FORMAT, "version": VERSION, "model": model,
        "weights": {"description": weights_info.get("description"), "sha1": weights_info.get("sha1")},
        "index": os.path.abspath(os.fspath(index)), "index_sha256": file_digest(index, "sha256"),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "method": method, "min_positives": int(min_positives),
        "images": {"scored": int(n_images), "unreadable": int(failed)},
        "pathologies": entries,
    })


# --------------------------------------------------------------------------- loading
def _refuse_constant(name):
    raise ValueError("%s is not a number JSON allows" % name)


def _threshold_value(path, name, key, value, closed=False):
    """A threshold from the file: op_thresh in (0, 1) (op_norm divides by t and by 1 - t), the
    PPV threshold in [0, 1] (a saturated float32 sigmoid can be exactly 0 or 1)."""
    if value is None:
        return float("nan")
    inside = isinstance(value, (int, float)) and (0.0 <= value <= 1.0 if closed else 0.0 < value < 1.0)
    if isinstance(value, bool) or not inside:
        raise WeightsError(path, "pathology %s: %s must be a number between 0 and 1 (%s) or null, not %s"
                           % (name, key, "inclusive" if closed else "exclusive", one_line(repr(value), 40)))
    return float(value)


def load_thresholds(path, model, weights_sha1=None):
    """``{"op_threshs": (18,) float32 (NaN: not recalibrated), "ppv80_threshs": same, "document"}``.

    Refuses, in one line naming the file: anything but a thresholds JSON of this format (size,
    encoding, syntax, NaN/Infinity, shape), thresholds outside (0, 1), pathology names that are
    not torchxrayvision's, a file fitted for another model, or for other weights (when both sha1s
    are known: a threshold belongs to the weights whose outputs it was fitted on).
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        if size > MAX_BYTES:
            raise WeightsError(path, "%d bytes; a thresholds file is a few KB" % size)
        with open(path, "rb") as f:
            doc = json.loads(f.read().decode("utf-8"), parse_constant=_refuse_constant)
    except OSError as err:
        raise WeightsError(path, "cannot read the thresholds file (%s)" % (err.strerror or err)) from None
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError included
        raise WeightsError(path, "not a thresholds JSON (%s)" % one_line(err, 120)) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise WeightsError(path, "not a thresholds file (expected \"format\": \"%s\"; write one with "
                                 "mxvision xrv calibrate)" % FORMAT)
    if doc.get("version") != VERSION:
        raise WeightsError(path, "thresholds format version %s; this mxvision reads version %d"
                           % (one_line(repr(doc.get("version")), 20), VERSION))
    if doc.get("model") != model:
        raise WeightsError(path, "fitted for model %s, not %s" % (one_line(repr(doc.get("model")), 60), model))
    weights = doc.get("weights")
    if not isinstance(weights, dict):
        raise WeightsError(path, "\"weights\" must be an object")
    fitted_sha1 = weights.get("sha1")
    if fitted_sha1 is not None and weights_sha1 is not None and fitted_sha1 != weights_sha1:
        raise WeightsError(path, "fitted on the outputs of weights with sha1 %s, these weights have "
                                 "sha1 %s" % (one_line(str(fitted_sha1), 44), weights_sha1))
    entries = doc.get("pathologies")
    if not isinstance(entries, dict) or not entries:
        raise WeightsError(path, "\"pathologies\" must be a non-empty object")
    op = np.full(len(DEFAULT_PATHOLOGIES), np.nan, dtype=np.float32)
    ppv = np.full(len(DEFAULT_PATHOLOGIES), np.nan, dtype=np.float32)
    for name, entry in entries.items():
        if name not in DEFAULT_PATHOLOGIES:
            raise WeightsError(path, "unknown pathology %s (torchxrayvision's names: %s, ...)"
                               % (one_line(repr(name), 40), ", ".join(DEFAULT_PATHOLOGIES[:3])))
        if not isinstance(entry, dict):
            raise WeightsError(path, "pathology %s: expected an object" % name)
        k = DEFAULT_PATHOLOGIES.index(name)
        op[k] = _threshold_value(path, name, "op_thresh", entry.get("op_thresh"))
        ppv[k] = _threshold_value(path, name, "ppv80_thresh", entry.get("ppv80_thresh"), closed=True)
    if np.isnan(op).all():
        raise WeightsError(path, "holds no op_thresh (every pathology was refused); nothing to load")
    return {"op_threshs": op, "ppv80_threshs": ppv, "document": doc}


def merged_op_threshs(published, recalibrated):
    """The op_threshs a model uses with a thresholds file: the recalibrated value where the file
    has one, the published one elsewhere (a refused pathology keeps torchxrayvision's)."""
    published = np.asarray(published, dtype=np.float32)
    recalibrated = np.asarray(recalibrated, dtype=np.float32)
    return np.where(np.isnan(recalibrated), published, recalibrated).astype(np.float32)


def apply_thresholds(net, path):
    """Make torchxrayvision port ``net`` calibrate with the thresholds file ``path`` (validated
    against its model name and weights); records what was replaced in ``net.thresholds_info``."""
    loaded = load_thresholds(path, net.weights, net.weights_info.get("sha1"))
    net.op_threshs = merged_op_threshs(net.op_threshs, loaded["op_threshs"])
    replaced = [DEFAULT_PATHOLOGIES[k] for k in np.flatnonzero(~np.isnan(loaded["op_threshs"]))]
    net.thresholds_info = {"file": os.path.abspath(path), "recalibrated": replaced,
                           "index": loaded["document"].get("index"),
                           "created": loaded["document"].get("created")}
    return net
