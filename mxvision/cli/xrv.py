"""``mxvision classify`` and ``mxvision xrv calibrate``: torchxrayvision's 18 pathology scores.

``classify`` is the MXNet counterpart of torchxrayvision's ``scripts/process_image.py``: one table
(pathologies down, images across) or JSON; with ``--out CSV`` (or ``--index CSV``) that of
``scripts/process_batch.py``: one CSV row per film. Outputs the chosen weights were not trained
on, and -- with calibration -- trained outputs without an operating point (torchxrayvision
returns a constant 0.5 for both), are marked instead of printed as if they were scores.
``xrv calibrate`` recomputes op_threshs (and PPV-80 thresholds) on the user's labelled films
(``scripts/model_calibrate.py``) into a JSON that ``classify --thresholds`` loads. ``xrv features``
writes a model's features (the autoencoder's latent...) for transfer learning: a feature store of an
index, or a ``.npz`` of image files (:mod:`mxvision.features.xrv`).
"""
from pathlib import Path

from mxvision.cli.common import add_ctx, non_empty, positive_float, positive_int
from mxvision.cli.output import TSV_HELP, print_json, tsv_field
from mxvision.errors import MxvisionError

NAME_WIDTH = 28


def _cmd_classify(args):
    from mxvision.inference import check_output_file, classify, classify_index, describe_int8_check, write_scores_csv
    from mxvision.models.xrv.common import DEFAULT_PATHOLOGIES
    if bool(args.images) == bool(args.index):
        raise MxvisionError("mxvision classify", "give IMAGE files or folders, or --index CSV (one of the two)")
    if args.out:
        check_output_file(args.out, "scores CSV")
    options = dict(model=args.model, weights=args.weights, calibrated=not args.no_calibration, ctx=args.ctx,
                   batch_size=args.batch_size, strict=args.strict, root=args.cache, progress=not args.quiet,
                   thresholds=args.thresholds, dtype=args.dtype, calibration=args.calibration)
    if args.int8_tolerance is not None:
        options["int8_tolerance"] = args.int8_tolerance
    for given, option in ((args.calibration, "--calibration"), (args.int8_tolerance, "--int8-tolerance")):
        if given is not None and args.dtype != "int8":
            raise MxvisionError(option, "is for --dtype int8 (float32 needs no calibration films)")
    index = None
    if args.index:
        results, index = classify_index(args.index, **options)
    else:
        results = classify(args.images, **options)
    if args.out:
        path = write_scores_csv(results, args.out, index=index)
        ok = [r for r in results if "error" not in r]
        kind = ("calibrated (op_threshs%s)" % (" from " + args.thresholds if args.thresholds else "")
                if ok and ok[0]["calibrated"] else "uncalibrated (sigmoid)")
        if ok and ok[0]["dtype"] == "int8":
            kind += ", INT8 (%s)" % describe_int8_check(ok[0]["int8"])
        print(f"{len(results)} films scored with {args.model}, {kind}: {len(ok)} scored, "
              f"{len(results) - len(ok)} unreadable (error column); wrote {tsv_field(path)}")
    elif args.json:
        print_json(results)
    else:
        _print_table(results, DEFAULT_PATHOLOGIES)
    return 1 if any("error" in r for r in results) else 0


def _print_table(results, pathologies):
    from mxvision.inference import describe_int8_check
    ok = [r for r in results if "error" not in r]
    for r in results:
        if "error" in r:
            print(f"ERROR\t{tsv_field(r['error'])}")
    if not ok:
        return
    first = ok[0]
    kind = "calibrated (op_threshs)" if first["calibrated"] else "uncalibrated (sigmoid)"
    if first["calibrated"] and first.get("thresholds"):
        kind = "calibrated (op_threshs of %s for %s)" % (tsv_field(first["thresholds"]["file"]),
                                                         ", ".join(first["thresholds"]["recalibrated"]))
    if first["dtype"] == "int8":
        kind += ", INT8 (%s)" % describe_int8_check(first["int8"])
    print(f"model {first['model']}, {kind}; weights: {first['weights']}")
    names = [tsv_field(Path(r["path"]).name) for r in ok]  # one table line whatever the names hold
    width = max(12, *(len(n) for n in names))
    print(" " * NAME_WIDTH + "  ".join(n.rjust(width) for n in names))
    notes = {}
    for name in pathologies:
        cells = []
        for r in ok:
            value = r["scores"][name]
            if value is None:
                why = r["unavailable"][name]
                mark = "untrained" if why == "untrained" else "no threshold"
                notes[mark] = why
                cells.append(f"({mark})".rjust(width))
            else:
                cells.append(f"{value:.4f}".rjust(width))
        print(name.ljust(NAME_WIDTH) + "  ".join(cells))
    if "untrained" in notes:
        print("(untrained): these weights were not trained on this pathology; its output means nothing")
    if "no threshold" in notes:
        print("(no threshold): no operating point for this pathology (calibrated output would be the "
              "constant 0.5); --no-calibration shows its probability")


def add_parsers(sub):
    """The torchxrayvision commands: classify, xrv calibrate, xrv finetune."""
    from mxvision.models.xrv.thresholds import DEFAULT_MIN_POSITIVES
    p = sub.add_parser("classify", help="18 pathology scores with a torchxrayvision model (like process_image.py)",
                       description="18 pathology scores with a torchxrayvision model: a table "
                                   "(pathologies down, images across; an 'ERROR<tab>message' line "
                                   "per unreadable file first) or --json. File names and messages "
                                   f"are escaped as in a TSV: {TSV_HELP.split('; ', 1)[1]}.")
    p.add_argument("images", type=non_empty, nargs="*", metavar="IMAGE",
                   help="PNG/JPEG/DICOM files or folders of them (or --index)")
    p.add_argument("--index", type=non_empty, default=None, metavar="CSV",
                   help="score the images of an index CSV instead (in its row order)")
    p.add_argument("--out", type=non_empty, default=None, metavar="CSV",
                   help="write one CSV (path, the index's id/label/patient_id/split/view and pathology "
                        "columns as label:NAME, one column per pathology, error) instead of printing")
    p.add_argument("--thresholds", type=non_empty, default=None, metavar="JSON",
                   help="op_threshs recomputed by 'mxvision xrv calibrate' (for the same model and "
                        "weights) instead of the published ones")
    add_model_options(p)
    p.add_argument("--no-calibration", action="store_true",
                   help="skip op_threshs: print sigmoid probabilities instead of calibrated scores")
    p.add_argument("--json", action="store_true", help="print JSON (one object per image)")
    p.add_argument("--batch-size", type=positive_int(), default=1)
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image")
    p.add_argument("--dtype", default="float32", choices=["float32", "int8"],
                   help="compute precision; int8 (CPU only) is calibrated on half the --calibration films, "
                        "checked on the other half, and refused when a score moves more than "
                        "--int8-tolerance from float32 (default: float32)")
    p.add_argument("--calibration", type=non_empty, default=None, metavar="INDEX_OR_FOLDER",
                   help="--dtype int8: films to calibrate and check on (index CSV or folder, at least 4; "
                        "the converted network is kept in the user cache)")
    p.add_argument("--int8-tolerance", type=positive_float(1.0), default=None, metavar="SCORE",
                   help="--dtype int8: largest score difference to float32 accepted (default: 0.02)")
    add_cache_options(p)
    add_ctx(p)
    p.set_defaults(func=_cmd_classify)

    x = sub.add_parser("xrv", help="torchxrayvision models: recalibrate, fine-tune on your labelled films, or compute features",
                       description="torchxrayvision models: recalibrate their thresholds, fine-tune them on your "
                                   "labelled films, or compute their features for transfer learning.")
    xsub = x.add_subparsers(dest="xrv_command", metavar="ACTION")
    xsub.required = True
    c = xsub.add_parser(
        "calibrate", help="recompute op_threshs and PPV-80 thresholds on labelled films (a JSON classify loads)",
        description="Score the index's films with the model's uncalibrated sigmoid outputs and, per "
                    "pathology the index labels (columns named as torchxrayvision's pathologies, "
                    "1/0/empty; else the label column, e.g. nodule/normal), recompute op_threshs as "
                    "torchxrayvision did (ROC point of largest tpr - fpr) and its PPV-80 threshold, "
                    "with the AUC and its 95% intervals. Thresholds fitted on fewer than "
                    "--min-positives positive films are left null, with the reason.")
    add_model_options(c)
    c.add_argument("--index", type=non_empty, required=True, metavar="CSV", help="index CSV of labelled films")
    c.add_argument("--out", type=non_empty, required=True, metavar="JSON", help="thresholds file to write")
    c.add_argument("--split", type=non_empty, default=None, metavar="NAME",
                   help="only the index's films of this split (e.g. test: films a fine-tuning never saw)")
    c.add_argument("--min-positives", type=positive_int(), default=DEFAULT_MIN_POSITIVES, metavar="N",
                   help="fewest positive films a threshold is fitted on (default %d)" % DEFAULT_MIN_POSITIVES)
    c.add_argument("--batch-size", type=positive_int(), default=8)
    add_cache_options(c)
    add_ctx(c)
    c.set_defaults(func=_cmd_calibrate)
    add_finetune_parser(xsub)
    add_features_parser(xsub)


def _cmd_calibrate(args):
    from mxvision.inference import calibrate_xrv
    doc = calibrate_xrv(args.index, args.out, model=args.model, weights=args.weights,
                        min_positives=args.min_positives, ctx=args.ctx, batch_size=args.batch_size,
                        root=args.cache, progress=not args.quiet, split=args.split)
    images = doc["images"]
    where = f" of split {args.split}" if args.split else ""
    print(f"{doc['model']} on {images['scored']} films{where} ({images['unreadable']} unreadable); "
          f"weights: {doc['weights']['description']}")
    print("pathology".ljust(NAME_WIDTH) + "n".rjust(6) + "pos".rjust(6) + "AUC".rjust(8) + "  95% CI (DeLong)".ljust(18)
          + "op_thresh".rjust(12) + "ppv80".rjust(12) + "  note")
    for name, e in doc["pathologies"].items():
        auc = e.get("auc")
        ci = e.get("ci_delong")
        fmt = lambda v: "-" if v is None else "%.4g" % v  # noqa: E731
        print(name.ljust(NAME_WIDTH) + str(e["n"]).rjust(6) + str(e["positives"]).rjust(6)
              + ("-" if auc is None else "%.3f" % auc).rjust(8)
              + ("  [%.3f, %.3f]" % tuple(ci) if ci else "  -").ljust(18)
              + fmt(e["op_thresh"]).rjust(12) + fmt(e["ppv80_thresh"]).rjust(12)
              + ("  refused: " + e["refused"] if e["refused"] else ""))
    fitted = sum(e["op_thresh"] is not None for e in doc["pathologies"].values())
    print(f"{fitted} thresholds fitted (min {doc['min_positives']} positives); wrote {tsv_field(str(Path(args.out).resolve()))}")
    return 0


def add_finetune_parser(xsub):
    """``mxvision xrv finetune``: the port's classifier on the user's labels (masked BCE)."""
    from mxvision.cli.common import MAX_SEED, label_names, non_negative_int, positive_float
    f = xsub.add_parser(
        "finetune", help="fine-tune a torchxrayvision model's classifier on your labelled films (missing labels masked)",
        description="Train the model's last layer on the pooled features of the frozen network, for the "
                    "chosen pathologies, with a binary cross-entropy that empty (unknown) labels do not "
                    "enter; the other outputs keep their published weights. Keeps the epoch of best mean "
                    "validation AUC (epoch 0: the model as it came). Recompute thresholds afterwards "
                    "with 'mxvision xrv calibrate --weights RUN/xrv.params'.")
    add_model_options(f)
    f.add_argument("--index", type=non_empty, required=True, metavar="CSV",
                   help="index CSV with a split column and pathology columns (1, 0 or empty)")
    f.add_argument("--out", type=non_empty, required=True, metavar="RUN", help="run folder to write")
    f.add_argument("--labels", type=label_names, default="all", metavar="all|NAME,NAME",
                   help="pathologies to train (default: every pathology column of the index)")
    f.add_argument("--epochs", type=positive_int(), default=20)
    f.add_argument("--lr", type=positive_float(10.0), default=0.01, help="SGD learning rate on standardized features")
    f.add_argument("--batch-size", type=positive_int(), default=32)
    f.add_argument("--seed", type=non_negative_int(MAX_SEED), default=0, help="shuffling seed (default 0)")
    add_cache_options(f)
    add_ctx(f)
    f.set_defaults(func=_cmd_finetune)


def _cmd_finetune(args):
    from mxvision.train.xrv_finetune import finetune_xrv
    config = finetune_xrv(args.index, args.out, model=args.model, weights=args.weights, labels=args.labels,
                          epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                          ctx=args.ctx, root=args.cache, progress=not args.quiet)
    films = config["films"]
    print(f"{config['model']} fine-tuned on {films['train']} films ({films['val']} validation, "
          f"{films['unreadable']} unreadable) for {', '.join(config['labels'])}; best epoch {config['best_epoch']}")
    for name in config["labels"]:
        before, after = config["val_label_auc_before"][name], config["val_label_auc_after"][name]
        print(f"{name.ljust(NAME_WIDTH)}validation AUC {before:.3f} -> {after:.3f}")
    print(f"run in {tsv_field(args.out)}; {config['note']}")
    return 0


def add_features_parser(xsub):
    """``mxvision xrv features``: a model's features of an index (a feature store) or of image files (.npz)."""
    from mxvision.features.xrv import DEFAULT_MODEL
    f = xsub.add_parser(
        "features", help="a torchxrayvision model's features (the autoencoder's latent...) for transfer learning",
        description="The features of a torchxrayvision model (its 'features' backbone cut; for "
                    "resnet_ae-101-elastic the (512, 3, 3) latent of its encoder). With --index: a "
                    "feature store in --out, the same as 'mxvision extract --backbone MODEL --cut "
                    "features', which 'mxvision train --features OUT' trains a head on. With IMAGE "
                    "files or folders (no labels): one .npz (paths, features: one flattened row per "
                    "film, feature_shape) that numpy.load reads without pickle.")
    f.add_argument("images", type=non_empty, nargs="*", metavar="IMAGE",
                   help="PNG/JPEG/DICOM files or folders of them (or --index)")
    f.add_argument("--index", type=non_empty, default=None, metavar="CSV",
                   help="index CSV (path,label[,patient_id,split,view]) or a folder per class")
    f.add_argument("--out", type=non_empty, required=True, metavar="STORE|FILE.npz",
                   help="feature store folder (--index), or the .npz to write (IMAGE...)")
    f.add_argument("--model", type=non_empty, default=DEFAULT_MODEL,
                   help="torchxrayvision model with a features cut (default: %s)" % DEFAULT_MODEL)
    f.add_argument("--weights", type=non_empty, default=None, metavar="PATH",
                   help="a local torchxrayvision .pt (or converted .params) instead of the published weights")
    f.add_argument("--batch-size", type=positive_int(), default=16)
    f.add_argument("--strict", action="store_true", help="stop at the first unreadable image")
    f.add_argument("--overwrite", action="store_true", help="--index: discard a store of another configuration in --out")
    add_cache_options(f)
    add_ctx(f)
    f.set_defaults(func=_cmd_features)


def _cmd_features(args):
    from mxvision.features import xrv
    if bool(args.images) == bool(args.index):
        raise MxvisionError("mxvision xrv features", "give IMAGE files or folders, or --index CSV (one of the two)")
    options = dict(model=args.model, weights=args.weights, ctx=args.ctx, batch_size=args.batch_size,
                   strict=args.strict, root=args.cache, progress=not args.quiet)
    if args.index:
        m = xrv.extract_xrv_features(args.index, args.out, overwrite=args.overwrite, **options).manifest
        print(f"{m['n_features']} feature maps {tuple(m['feature_shape'])} of {args.model} in {tsv_field(args.out)} "
              f"({m['n_skipped']} skipped); weights: {m['weights']['description']}; "
              f"train a head on them: mxvision train --features {tsv_field(args.out)}")
        return 1 if m["n_skipped"] and args.strict else 0
    results, info = xrv.encode_images(args.images, **options)
    for r in results:
        if "error" in r:
            print(f"ERROR\t{tsv_field(r['error'])}")
    path = xrv.write_features_npz(results, info, args.out)
    ok = sum("error" not in r for r in results)
    print(f"{ok} films' features {tuple(info['feature_shape'])} of {args.model} ({len(results) - ok} unreadable); "
          f"weights: {info['weights']}; wrote {tsv_field(path)}")
    return 1 if ok < len(results) else 0


def add_model_options(p):
    """``--model`` and ``--weights``: which torchxrayvision model, and a local weights file."""
    from mxvision.models.xrv.common import list_weights
    p.add_argument("--model", default="densenet121-res224-all", choices=list_weights(),
                   help="torchxrayvision weights name (default: densenet121-res224-all)")
    p.add_argument("--weights", type=non_empty, default=None, metavar="PATH",
                   help="a local torchxrayvision .pt (or converted .params) for the chosen architecture "
                        "instead of downloading the published weights")


def add_cache_options(p):
    """``--cache`` and ``--quiet``: where weights are kept, and no progress bars."""
    p.add_argument("--cache", type=non_empty, default=None, metavar="DIR",
                   help="weights cache folder (default: $MXVISION_CACHE/models or ~/.mxnet/models)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
