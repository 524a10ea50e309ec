"""Scoring new image files: ``predict`` with a trained Xvision run, ``classify`` with a
torchxrayvision port.

Both take files or folders (:func:`mxvision.data.folder.expand_images`), preprocess each image
exactly as the network was trained on it, score in batches, and report an unreadable file as
``{"path", "error"}`` beside the others' results (``strict=True`` raises instead).

The torchxrayvision model card, and its MXNet equivalent (preprocessing in
:mod:`mxvision.data.xrv_transforms`)::

    # PyTorch / torchxrayvision                         # MXNet / mxvision
    model = xrv.models.get_model(name)                  model = mxv.get_model(name)
    img = xrv.datasets.normalize(imread(p), 255)        img = normalize(imread(p), 255)
    img = img.mean(2)[None, ...]                        img = img.mean(2)[None, ...]
    img = XRayCenterCrop()(img)                         img = XRayCenterCrop()(img)
    img = XRayResizer(224)(img)                         img = XRayResizer(224)(img)
    preds = model(torch.from_numpy(img)[None])          preds = model(mx.nd.array(img[None]))
    dict(zip(default_pathologies, preds[0]))            dict(zip(DEFAULT_PATHOLOGIES, preds[0].asnumpy()))

or, in one call that reads the files and marks outputs the weights cannot give,
``classify(paths, model=name)``.
"""
import csv
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import mxnet as mx
import numpy as np
from tqdm import tqdm

from mxvision.data import transforms
from mxvision.data.dataset import XrayDataset
from mxvision.data.folder import expand_images
from mxvision.data.index import read_index
from mxvision.data.xrv_transforms import load_xray, preprocess
from mxvision.errors import BadImage, BadIndex, BadRun, MxvisionError, one_line
from mxvision.features import quantize
from mxvision.models import zoo
from mxvision.models.xrv.common import DEFAULT_PATHOLOGIES, get_weights_spec
from mxvision.models.xrv.thresholds import DEFAULT_MIN_POSITIVES, fit_thresholds, thresholds_document
from mxvision.runtime import hybridize_for_inference, parse_ctx
from mxvision.train import multilabel
from mxvision.train.calibrators import calibrate_probs, load_run_calibrator
from mxvision.train.calibrators import describe as describe_calibration
from mxvision.train.intervals import auc_with_intervals
from mxvision.train.loop import load_classifier
from mxvision.train.runs import load_run
from mxvision.utils import atomic_path, write_json

__all__ = ["predict", "classify", "unavailable_outputs", "DEFAULT_MODEL", "classify_index", "scores_table",
           "write_scores_csv", "calibrate_xrv", "check_output_file", "int8_classifier",
           "check_int8_arguments", "describe_int8_check", "parameters_sha1", "scoring_sha1", "DEFAULT_INT8_TOLERANCE",
           "CLASSIFY_DTYPES"]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "densenet121-res224-all"
CLASSIFY_DTYPES = ("float32", "int8")
#: How far (absolute) an INT8 score may be from the float32 one on the held-out calibration films:
#: the bar of issue #16. Post-training INT8 of the ports with random, realistic weights misses it
#: by 5-20x (docs/BENCHMARKS_XRV.md), so INT8 is used only where it is measured to keep it.
DEFAULT_INT8_TOLERANCE = 0.02
MIN_INT8_FILMS = 4


def predict(run_dir, images, ctx=None, batch_size=8, strict=False):
    """Probabilities per class for each image (files or folders).

    Returns one dict per image: ``{"path", "probabilities": {class: p}, "predicted",
    "calibration"}`` (a multi-label run, :mod:`mxvision.train.multilabel`: ``{label: p}``, one
    sigmoid probability per label, and ``predicted`` the labels at 0.5 or above joined by ``|``,
    empty for none), or ``{"path", "error"}`` for an unreadable image (``strict=True`` raises
    instead). A folder without images, or no input at all, raises BadIndex (``no images found in
    DIR``). A run trained with ``--calibrate`` gives calibrated probabilities (its calibrator
    applied after the softmax, :mod:`mxvision.train.calibrators`) and ``"calibration":
    "calibrated (platt)"``; otherwise ``"uncalibrated"``.
    """
    paths = expand_images([images] if isinstance(images, (str, Path)) else images, require=True)
    ctx = parse_ctx(ctx)
    multi = multilabel.is_multilabel(load_run(run_dir)[0])
    net, config = load_classifier(run_dir, ctx=ctx, softmax=not multi)
    calibrator = load_run_calibrator(run_dir)
    classes = multilabel.output_names(config)
    preset = transforms.get_preset(config["features"]["preprocessing"]["name"])
    net.hybridize()
    results, batch = [], []

    def flush():
        if batch:
            probs = net(mx.nd.array(np.stack([img for _, img in batch]), ctx=ctx)).asnumpy()
            if not np.isfinite(probs).all():  # finite parameters can still overflow
                raise BadRun(Path(run_dir) / "best.params", "gives non-finite probabilities (NaN or "
                                                            "infinity); its parameters are corrupt")
            probs = multilabel.sigmoid(probs) if multi else calibrate_probs(calibrator, probs)
            for (path, _), p in zip(batch, probs):
                predicted = "|".join(c for c, v in zip(classes, p) if v >= 0.5) if multi else \
                    classes[int(p.argmax())]
                results.append({"path": str(path), "probabilities": dict(zip(classes, map(float, p))),
                                "predicted": predicted,
                                "calibration": describe_calibration(calibrator)})
            batch.clear()

    for path in paths:
        try:
            batch.append((path, transforms.load_image(path, preset)))
        except BadImage as err:
            if strict:
                raise
            flush()
            results.append({"path": str(path), "error": str(err)})
        if len(batch) >= batch_size:
            flush()
    flush()
    return results


def unavailable_outputs(spec, calibrated, op_threshs=None):
    """Per-output reason why a score cannot be given (None when it can); ``op_threshs``: the
    thresholds the model calibrates with when they are not the published ones (a thresholds file)."""
    reasons = {i: "untrained" for i in spec.untrained}
    if calibrated:
        no_threshold = spec.no_threshold if op_threshs is None else [
            i for i, t in enumerate(op_threshs) if np.isnan(t) and i not in reasons]
        reasons.update({i: "no operating point (calibrated output is the constant 0.5)"
                        for i in no_threshold})
    return reasons


def parameters_sha1(net):
    """sha1 over a block's parameter names and values: what its INT8 conversion is keyed by
    (random weights have no file). The thresholds are not parameters; the INT8 graph ends at the
    logits, before them (:func:`scoring_sha1` keys the check instead)."""
    digest = hashlib.sha1()
    params = net.collect_params()
    for name in sorted(params):  # without the prefix: another instance of the same model is densenet1_
        param = params[name]
        digest.update(name[len(net.prefix):].encode() if name.startswith(net.prefix) else name.encode())
        digest.update(np.ascontiguousarray(param.data().asnumpy()).tobytes())
    return digest.hexdigest()


def _xrv_films(paths, resolution, what):
    films = []
    for p in paths:
        try:
            films.append(preprocess(load_xray(p), resolution))
        except BadImage as err:
            raise MxvisionError(what, f"a film cannot be read ({one_line(err, 160)})") from None
    return np.stack(films)


def scoring_sha1(net, reasons):
    """sha1 of how ``net``'s logits become scores: op_norm with which thresholds, or a sigmoid, or
    none, and which outputs are left out. The INT8 graph ends at the logits, so one converted
    network serves every scoring; its check does not: op_norm stretches a probability difference
    below a threshold t by 1/(2t)."""
    calibrated = bool(net.calibrated and net.op_threshs is not None)
    thresholds = [None if np.isnan(t) else float(t) for t in net.op_threshs] if calibrated else None
    scoring = {"op_threshs": thresholds, "sigmoid": bool(not calibrated and net.apply_sigmoid),
               "excluded_outputs": sorted(reasons or {})}
    return hashlib.sha1(json.dumps(scoring, sort_keys=True).encode()).hexdigest()


def _recorded_difference(path):
    """The largest difference a kept check recorded, or None."""
    try:
        worst = json.loads(Path(path).read_text())["max_score_difference"]
        if isinstance(worst, float) and worst >= 0:
            return worst
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        pass  # none kept, or unreadable: checked again
    return None


def check_int8_arguments(ctx, calibration, tolerance):
    """One line for what makes an INT8 classifier impossible, before any model is built: a GPU
    context, no or too few calibration films, a tolerance that is not a positive number.
    Returns the calibration films and where they came from: ``(paths, source)``."""
    quantize.check_cpu("int8", ctx)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < float("inf"):
        raise MxvisionError(f"--int8-tolerance {tolerance}", "must be a finite number above 0")
    if calibration is None:
        raise MxvisionError("--dtype int8", "needs --calibration (an index CSV or a folder of films) to "
                                            "calibrate and check the INT8 scores on")
    paths, source = quantize.calibration_paths(calibration, ())
    if len(paths) < MIN_INT8_FILMS:
        raise MxvisionError(f"--calibration {calibration}", f"holds {len(paths)} film(s); INT8 needs at least "
                            f"{MIN_INT8_FILMS}: half calibrate, half check the scores")
    return paths, source


def int8_classifier(net, model, ctx, calibration, tolerance=DEFAULT_INT8_TOLERANCE, reasons=None, keep=None):
    """The INT8 version of the float32 classifier ``net`` (as :func:`classify` builds it), and
    the check that it gives the same scores: ``(scorer, check)``, ``scorer(x)`` giving what
    ``net(x)`` gives for a preprocessed batch.

    ``calibration`` (an index CSV, a folder of films or a list of files; at least
    :data:`MIN_INT8_FILMS`) is split in two: the even-numbered films calibrate MXNet's quantizer
    (as ``extract --dtype int8``, which takes half of those films to calibrate on and the other
    half to choose the calibration by agreement with float32 -- with fewer than 8 films, entropy
    on all of them; converted once and kept in the user cache,
    :func:`mxvision.features.quantize.prepare`), the odd-numbered ones are scored in both
    precisions. If any available output (``reasons``: those that are not, as
    :func:`unavailable_outputs` gives them) differs by more than ``tolerance``, one line says by
    how much and nothing is scored: INT8 scores that are not the model's are not offered.
    ``check`` records the films, the largest difference and the conversion's provenance.
    ``keep``: a folder to leave the converted network's files in (``check["files"]`` names them;
    a served archive packs them), instead of a temporary one.
    """
    spec = get_weights_spec(model)
    paths, source = check_int8_arguments(ctx, calibration, tolerance)
    calibrate_on, check_on = paths[::2], paths[1::2]
    checked = _xrv_films(check_on, spec.resolution, f"--calibration {calibration}")  # before converting
    preset = f"xrv{spec.resolution}"
    features_info = {"backbone": model, "cut": "scores" if net.op_threshs is None else "calibrated scores",
                     "weights": {"sha1": parameters_sha1(net)}, "preprocessing": preset}
    with tempfile.TemporaryDirectory(prefix="mxvision-int8-") as folder:
        folder = folder if keep is None else keep
        block, info = quantize.prepare(net, "int8", ctx, preset, features_info, folder, calibration=calibrate_on)
    block.hybridize(static_alloc=True, static_shape=True)

    def scorer(x):  # the exported graph ends at the logits; op_norm or the sigmoid follow as in net
        return net.postprocess(block(x))

    # the check's result is kept beside the converted network: a later call with the same films
    # does not score them twice again
    recorded = Path(info["cache_entry"]) / ("check-%s-%s.json" % (quantize.calibration_hash(check_on, preset),
                                                                   scoring_sha1(net, reasons)))
    worst = _recorded_difference(recorded)
    if worst is None:
        x = mx.nd.array(checked, ctx=ctx)
        want, got = net(x).asnumpy(), scorer(x).asnumpy()
        available = [k for k in range(want.shape[1]) if k not in (reasons or {})]
        if not (np.isfinite(got).all() and np.isfinite(want).all()):
            worst = float("inf")  # refused below, and not kept
        else:
            worst = float(np.abs(want[:, available] - got[:, available]).max()) if available else 0.0
        if info["cache"] != "off" and np.isfinite(worst):
            try:
                with atomic_path(recorded) as tmp:
                    write_json(tmp, {"max_score_difference": worst, "films": check_on,
                                     "excluded_outputs": sorted(reasons or {})})
            except OSError as err:  # the entry went away meanwhile (cache clear): nothing lost
                log.info("check not kept in the cache (%s)", one_line(err, 120))
    if not worst <= tolerance:  # NaN (a non-finite float32 score) is refused too
        raise MxvisionError("--dtype int8", f"{model}'s INT8 scores differ from float32 by up to {worst:.3f} on "
                            f"{len(check_on)} held-out calibration films, more than --int8-tolerance "
                            f"{tolerance:g}; score in float32")
    check = {"films": len(check_on), "max_score_difference": worst, "tolerance": float(tolerance),
             "calibration": {"source": source, "n_images": info["calibration"]["n_images"],
                             "relu_unfused": info["calibration"].get("relu_unfused", 0)}, "cache": info["cache"],
             "key": info["key"]}
    if keep is not None:
        check["files"] = {"symbol": str(Path(keep) / info["symbol"]), "params": str(Path(keep) / info["params"])}
    return scorer, check


def describe_int8_check(check):
    """``within X of float32 on N held-out calibration films``: what an INT8 result's (or an
    archive manifest's) ``int8`` check says, for the lines the commands print."""
    return "within %.3f of float32 on %d held-out calibration films" % (check["max_score_difference"],
                                                                        check["films"])


def classify(images, model=DEFAULT_MODEL, weights=None, calibrated=True, ctx=None, batch_size=1,
             strict=False, root=None, progress=False, thresholds=None, dtype="float32", calibration=None,
             int8_tolerance=DEFAULT_INT8_TOLERANCE):
    """Score chest X-ray files (or folders of them) for the 18 pathologies; one dict per image.

    Each result has ``path``, ``model``, ``weights`` (which weights were used), ``calibrated``,
    ``outputs`` (the 18 raw model outputs in :data:`DEFAULT_PATHOLOGIES` order, exactly what
    torchxrayvision's ``model(img)`` returns), ``scores`` (pathology -> value, or None where the
    weights cannot give one: ``untrained`` outputs, and with calibration the trained outputs that
    have no operating point) and ``unavailable`` (pathology -> reason). Without calibration the
    outputs are sigmoid probabilities. An unreadable file gives ``{"path", "error"}`` (or raises
    BadImage with ``strict=True``); a folder without images, or no input, raises BadIndex.
    ``thresholds``: a file of ``mxvision xrv calibrate`` whose op_threshs replace the published
    ones (then each result's ``thresholds`` names it and the pathologies it recalibrated).
    ``progress`` shows the download's and the scoring's progress bars.
    ``dtype="int8"`` scores with the INT8 network of :func:`int8_classifier`, calibrated and
    checked on the ``calibration`` films (each result's ``int8`` records the check); it refuses,
    in one line, when its scores would be more than ``int8_tolerance`` from float32.
    """
    if dtype not in CLASSIFY_DTYPES:
        raise MxvisionError(f"--dtype {dtype}", f"expected one of {', '.join(CLASSIFY_DTYPES)}")
    spec = get_weights_spec(model)
    paths = expand_images([images] if isinstance(images, (str, Path)) else images, require=True)
    ctx = parse_ctx(ctx)
    if dtype == "int8":
        check_int8_arguments(ctx, calibration, int8_tolerance)
    net = zoo.get_model(model, weights=weights, calibrated=calibrated, apply_sigmoid=not calibrated,
                        ctx=ctx, root=root, progress=progress, thresholds=thresholds)
    reasons = unavailable_outputs(spec, calibrated, net.op_threshs)
    check = None
    if dtype == "int8":
        scorer, check = int8_classifier(net, model, ctx, calibration, int8_tolerance, reasons)
    else:
        scorer = hybridize_for_inference(net, ctx)
    results = [None] * len(paths)
    batch = []

    def flush():
        if not batch:
            return
        x = mx.nd.array(np.stack([img for _, img in batch]), ctx=ctx)
        out = scorer(x).asnumpy()
        for (i, _), row in zip(batch, out):
            scores = {name: (None if k in reasons else float(row[k])) for k, name in enumerate(DEFAULT_PATHOLOGIES)}
            results[i] = {
                "path": str(paths[i]), "model": model, "weights": net.weights_info["description"],
                "calibrated": bool(calibrated and net.op_threshs is not None),
                "outputs": [float(v) for v in row], "scores": scores,
                "unavailable": {DEFAULT_PATHOLOGIES[k]: why for k, why in sorted(reasons.items())},
                "thresholds": net.thresholds_info, "weights_sha1": net.weights_info.get("sha1"),
                "dtype": dtype, **({"int8": check} if check else {}),
            }
        batch.clear()

    for i, path in enumerate(tqdm(paths, desc="classify", unit="img", disable=not progress or len(paths) < 2)):
        try:
            img = preprocess(load_xray(path), spec.resolution)
        except BadImage as err:
            if strict:
                raise
            results[i] = {"path": str(path), "error": str(err)}
            continue
        batch.append((i, img))
        if len(batch) >= max(1, int(batch_size)):
            flush()
    flush()
    return results


# --------------------------------------------------------------------------- whole folders and indexes
def classify_index(index_csv, **kwargs):
    """:func:`classify` over the images of an index CSV, in its row order: ``(results, index)``."""
    index = read_index(index_csv)
    results = classify(index.paths, **kwargs)
    if len(results) != len(index):  # a row naming a folder expanded into its images
        raise BadIndex(index_csv, "a row names a folder, not an image file; list image files only")
    return results, index


def scores_table(results, index=None):
    """``(header, rows)`` of the scores CSV: ``path``; the index's ``id`` and its ``label``,
    ``patient_id``, ``split``, ``view`` columns; its pathology label columns as ``label:NAME``;
    then one column per pathology (empty where the weights give no score), then ``error``."""
    known = [c for c in ("label", "patient_id", "split", "view") if index is not None and c in index.columns]
    truth = [c for c in DEFAULT_PATHOLOGIES if index is not None and c in index.columns]
    header = ["path"] + (["id"] if index is not None else []) + known + ["label:" + c for c in truth] \
        + list(DEFAULT_PATHOLOGIES) + ["error"]
    records = index.records() if index is not None else [None] * len(results)
    ids = index.ids if index is not None else [None] * len(results)
    rows = []
    for r, rec, image_id in zip(results, records, ids):
        row = [r["path"]] + ([image_id] if index is not None else [])
        row += [rec.get(c, "") for c in known] + [rec.get(c, "") for c in truth]
        if "error" in r:
            row += [""] * len(DEFAULT_PATHOLOGIES) + [r["error"]]
        else:
            row += ["" if r["scores"][p] is None else "%.8g" % r["scores"][p] for p in DEFAULT_PATHOLOGIES]
            row.append("")
        rows.append(row)
    return header, rows


def check_output_file(path, what):
    """Refuse, before any work, an output path that names a folder (one line naming it)."""
    if os.path.isdir(path):
        raise MxvisionError(path, "is a folder; give the file name of the %s to write" % what)


def write_scores_csv(results, out_csv, index=None):
    """Write :func:`scores_table` to ``out_csv`` atomically (complete or absent); returns its path."""
    check_output_file(out_csv, "scores CSV")
    header, rows = scores_table(results, index)
    with atomic_path(out_csv) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
    return os.path.abspath(out_csv)


def calibrate_xrv(index_csv, out, model=DEFAULT_MODEL, weights=None, min_positives=DEFAULT_MIN_POSITIVES,
                  ctx=None, batch_size=8, root=None, progress=False, split=None):
    """Recompute torchxrayvision's op_threshs and PPV-80 thresholds on labelled films; write ``out``.

    The labels are the index's pathology columns (named as :data:`DEFAULT_PATHOLOGIES`; ``1``,
    ``0`` or empty for unknown), or else its ``label`` column read as findings (``nodule`` ->
    Nodule, ``normal`` -> negative for all). The model's uncalibrated sigmoid outputs are scored
    with :func:`classify`; :func:`mxvision.models.xrv.thresholds.fit_thresholds` fits each
    pathology (AUC with DeLong and patient-bootstrap intervals). Returns the document written.
    ``split``: only the index's films of that split (e.g. ``test``, films a fine-tuning never saw).
    """
    spec = get_weights_spec(model)
    check_output_file(out, "thresholds JSON")
    index = read_index(index_csv)
    if split is not None:
        rows = [i for i, s in enumerate(index.splits) if s == split]
        if not rows:
            raise BadIndex(index_csv, "no film in split %r (splits: %s)"
                           % (split, ", ".join(sorted(set(index.splits) - {""})) or "none"))
        index = index.select(rows)
    try:
        data = XrayDataset.from_index(index)
    except ValueError as err:  # a pathology cell that is not 1, 0 or empty
        raise BadIndex(index_csv, one_line(err, 200)) from None
    names = [p for p in data.pathologies if p in DEFAULT_PATHOLOGIES]
    if not names:
        raise BadIndex(index_csv, "no pathology labels: add columns named as torchxrayvision's pathologies "
                                  "(%s, ...) holding 1, 0 or empty" % ", ".join(DEFAULT_PATHOLOGIES[:3]))
    results = classify(index.paths, model=model, weights=weights, calibrated=False, ctx=ctx,
                       batch_size=batch_size, root=root, progress=progress)
    scored = [i for i, r in enumerate(results) if "error" not in r]
    if not scored:
        raise BadIndex(index_csv, "none of its %d images could be read; first: %s" % (len(results), results[0]["error"]))
    columns = [data.pathologies.index(p) for p in names]
    targets = np.asarray(data.labels, dtype=np.float64)[scored][:, columns]
    probs = np.array([results[i]["outputs"] for i in scored], dtype=np.float64)
    groups = np.asarray(index.patient_ids, dtype=object)[scored]

    def auc(y, p, patients):
        figures = auc_with_intervals(y, p, groups=patients)
        figures.pop("method", None)
        return figures

    entries = fit_thresholds(targets, probs, names, untrained=[DEFAULT_PATHOLOGIES[k] for k in spec.untrained],
                             min_positives=min_positives, auc=auc, groups=groups)
    first = results[scored[0]]
    doc = thresholds_document(model, {"description": first["weights"], "sha1": first["weights_sha1"]}, index_csv, entries, min_positives,
                              len(scored), len(results) - len(scored),
                              auc_method="Mann-Whitney AUC; 95% intervals: DeLong, and percentile bootstrap "
                                         "over patients (mxvision.train.intervals.auc_with_intervals)")
    doc["split"] = split
    write_json(out, doc)
    return doc
