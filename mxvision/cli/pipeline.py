"""CLI commands of the Xvision pipeline: each parses its arguments and calls the Python API."""
from mxvision.cli.common import (add_ctx, add_extract_options, add_train_options, best_epoch_summary,
                                 extract_options, non_empty, open_probability, positive_float, positive_int, seed,
                                 train_options)
from mxvision.errors import MxvisionError
from mxvision.cli.output import TSV_HELP, print_json, print_tsv

#: :data:`mxvision.demo.MIN_PER_CLASS` and ``DEMO_PAIRS`` (not imported: that would import MXNet to
#: parse a command line; tests/test_demo.py checks they agree).
DEMO_MIN_PER_CLASS = 4
DEMO_PAIRS = 160


def _cmd_demo(args):
    from mxvision.demo import run_demo
    run_demo(args.out, n_per_class=args.n_per_class, seed=args.seed, epochs=args.epochs,
             weights=args.weights, ctx=args.ctx, progress=not args.quiet)


def _cmd_extract(args):
    from mxvision.features.extract import extract_features
    store = extract_features(args.index, args.out, **extract_options(args))
    m = store.manifest
    print(f"{m['n_features']} feature maps {tuple(m['feature_shape'])} in {store.path} "
          f"({m['n_skipped']} skipped); weights: {m['weights']['description']}; computed in "
          f"{m['dtype']}, stored as {m['storage_dtype']}{', pooled' if m['pooled'] else ''}")
    if m["timing"].get("streams", 1) > 1:
        print(f"the network ran as {m['timing']['streams']} streams side by side (MXVISION_STREAMS)")
    if m["dtype"] == "int8":
        from mxvision.features.quantize import describe_calibration
        print(f"INT8: {describe_calibration(m['precision']['calibration'])}")
    if m["n_skipped"] and args.strict:
        return 1


def _cmd_train(args):
    from mxvision.train.loop import train_head
    state = train_head(args.features, args.out, **train_options(args))
    print(f"{best_epoch_summary(state)}; run in {args.out}")
    if args.calibrate:
        from mxvision.train.calibrators import CALIBRATION, describe, load_run_calibrator
        calibrator = load_run_calibrator(args.out)
        fitted = calibrator["fitted_on"]
        print(f"{describe(calibrator)} on split {fitted['split']!r} ({fitted['n']} images, "
              f"{fitted['positives']} positive): {args.out}/{CALIBRATION}; predict, evaluate, "
              "export and the served archive apply it")


def _cmd_evaluate(args):
    from mxvision.evaluate import evaluate_run
    r = evaluate_run(args.run, args.features, args.out, split=args.split, ctx=args.ctx,
                     audit=not args.no_audit, allow_overlap=args.allow_overlap,
                     sensitivity=args.sensitivity)
    if r.get("task") == "multilabel":
        from mxvision.evaluate.multilabel import report_lines
        lines = report_lines(r)
    else:
        lines = evaluation_lines(r) + [f"confusion matrix: {r['confusion_matrix_png']}"]
    for line in lines:
        print(line)
    print(f"metrics: {args.out}/metrics.json")


def _interval(ci):
    return "[n/a]" if not ci or ci[0] is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def evaluation_lines(r):
    """What ``evaluate`` prints of a metrics.json body: the figures with their intervals."""
    where = (f"external: {r['features_dir']}, trained on {r['training_features_dir']}"
             if r.get("validation") == "external" else "internal")
    auc = "n/a" if r["auc"] is None else f"{r['auc']:.4f}"
    lines = [f"{r['split']} ({where}): n={r['n']} ({r['n_patients']} patients) accuracy "
             f"{r['accuracy']:.4f} AUC {auc} confusion matrix {r['confusion_matrix']} "
             f"(rows: true {r['classes']})"]
    ci = r.get("auc_intervals")
    if ci:
        lines.append(f"AUC 95% CI: {_interval(ci.get('ci_bootstrap'))} bootstrap over patients, "
                     f"{_interval(ci.get('ci_delong'))} DeLong")
    cal = r.get("calibration_metrics")
    if cal:
        lines.append(f"calibration{' (' + r['calibration'] + ')' if r.get('calibration') else ''}: "
                     f"Brier {cal['brier']:.4f}, ECE {cal['ece']:.4f}; reliability diagram: "
                     f"{r['reliability_diagram_png']}")
    for name, point in (r.get("operating_points") or {}).items():
        if not isinstance(point, dict) or "applied" not in point:
            continue
        a = point["applied"]
        figures = ", ".join(f"{k} {a[k]['value']:.3f} {_interval((a[k]['low'], a[k]['high']))}"
                            for k in ("sensitivity", "specificity", "ppv", "npv")
                            if a[k]["value"] is not None)
        lines.append(f"threshold {name} = {a['threshold']:.6g} (chosen on validation): {figures}")
    audit = r.get("shortcut_audit") or {}
    if audit.get("message"):
        lines.append(f"shortcut audit: {audit['message']}")
    return lines


def _cmd_predict(args):
    from mxvision.inference import predict
    results = predict(args.run, args.images, ctx=args.ctx, strict=args.strict)
    if args.json:
        print_json(results)
    else:
        for r in results:
            if "error" in r:
                print_tsv(r["path"], "ERROR", r["error"])
            else:
                probs = "  ".join(f"{c}={p:.4f}" for c, p in r["probabilities"].items())
                print_tsv(r["path"], r["predicted"], probs)
    return 1 if any("error" in r for r in results) else 0


def _cmd_export(args):
    problem = _export_problem(args)
    if problem:
        raise MxvisionError("export", problem)
    if args.mar:
        from mxvision.serve.archive import export_archive
        tolerance = {} if args.int8_tolerance is None else {"int8_tolerance": args.int8_tolerance}
        done = export_archive(args.mar, run=args.run, model=args.model, weights=args.weights,
                              dtype=args.dtype, ctx=args.ctx, calibration=args.calibration, **tolerance)
        m = done["manifest"]
        weights = m["weights"].get("description") or m["weights"].get("backbone")
        from mxvision.inference import describe_int8_check
        checked = ", " + describe_int8_check(m["int8"]) if "int8" in m else ""
        print(f"wrote {done['archive']}: model {done['name']} ({m['family']}, {m['precision']}{checked}; "
              f"weights: {weights}); serve it with `mxvision serve {done['archive']}`")
        return
    from mxvision.export import export_model
    paths = export_model(args.run, args.out, ctx=args.ctx, dtype=args.dtype)
    print(f"exported {paths['symbol']} and {paths['params']} (metadata: {paths['meta']})")


def _export_problem(args):
    if (args.run is None) == (args.model is None):
        return "give --run RUN (a trained Xvision run) or --model NAME (a torchxrayvision port)"
    if (args.out is None) == (args.mar is None):
        return "give --out PREFIX (symbol files) or --mar OUT.mar (a model archive to serve)"
    if args.model and not args.mar:
        return "--model exports a model archive only: add --mar OUT.mar"
    if args.weights and not args.model:
        return "--weights goes with --model"
    if args.dtype == "int8" and not args.mar:
        return "--dtype int8 is for --mar; --out exports the run's own precision (or float32)"
    for given, option in ((args.calibration, "--calibration"), (args.int8_tolerance, "--int8-tolerance")):
        if given is not None and not (args.model and args.dtype == "int8"):
            return f"{option} is for --model NAME --mar OUT.mar --dtype int8 (a run's INT8 network was " \
                   "calibrated when its features were extracted)"
    return None


def _cmd_models(args):
    from mxvision.models import zoo
    if args.family is not None and args.family not in zoo.list_families():
        raise MxvisionError("--family %s" % args.family, "unknown; known: %s" % ", ".join(zoo.list_families()))
    names = zoo.list_models(family=args.family)
    if args.names:
        print("\n".join(names))
        return
    rows = [(n, c.family, c.preset or "-", str(len(c.outputs)) if c.outputs else "-", c.licence or "-")
            for n, c in ((n, zoo.get_model_config(n)) for n in names)]
    header = ("name", "family", "input", "outputs", "licence of the pretrained weights")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    for row in [header] + rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[4])


def add_parsers(sub):
    """The pipeline commands: demo, extract, train, evaluate, predict, export, models."""
    p = sub.add_parser("demo", help="run the whole pipeline on generated radiographs (no downloads)")
    p.add_argument("--out", type=non_empty, default="mxvision-demo", help="output folder (default: mxvision-demo)")
    p.add_argument("--n-per-class", type=positive_int(low=DEMO_MIN_PER_CLASS), default=DEMO_PAIRS,
                   help="generated pairs (one patient filmed without and with a nodule), at least "
                        f"{DEMO_MIN_PER_CLASS} so train, val and test each get one (default {DEMO_PAIRS})")
    p.add_argument("--epochs", type=positive_int(), default=20)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--weights", choices=["imagenet", "none"], default=None,
                   help="default: ImageNet if already cached, random otherwise")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_ctx(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("extract", help="extract backbone features for an index CSV or class folders",
                       epilog="MXVISION_STREAMS=N in the environment (before the process starts) runs N "
                              "copies of the network side by side on alternate batches, each on its share "
                              "of the cores: the same features (float32 within oneDNN's rounding), faster "
                              "on a shared host (README, \"Fast on a CPU\")")
    add_extract_options(p)
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser("train", help="train the Xvision head on a feature store")
    add_train_options(p, calibrate=True)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="metrics, confusion matrix and ROC curve on a held-out split")
    p.add_argument("--run", type=non_empty, required=True)
    p.add_argument("--features", type=non_empty, default=None,
                   help="default: the feature store the run was trained on; another store is an "
                        "external validation (all its images, checked for shared patients/images)")
    p.add_argument("--out", type=non_empty, required=True)
    p.add_argument("--split", type=non_empty, default=None,
                   help="split to score (default: test of the training store, all of another store)")
    p.add_argument("--allow-overlap", action="store_true",
                   help="evaluate an external store even if it shares patients or images with the "
                        "training store (it is refused otherwise)")
    p.add_argument("--sensitivity", type=open_probability, default=0.9,
                   help="target sensitivity of the second operating point, chosen on the validation "
                        "split (default 0.9)")
    p.add_argument("--no-audit", action="store_true",
                   help="skip the shortcut audit (trivial image baselines on the same split)")
    add_ctx(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="class probabilities for images or folders of images",
                       description="Class probabilities for image files or folders of them. Output: "
                                   "one line per image, PATH, predicted class (or ERROR) and the "
                                   f"probabilities (or the error), {TSV_HELP}; or --json.")
    p.add_argument("--run", type=non_empty, required=True)
    p.add_argument("images", type=non_empty, nargs="+", metavar="IMAGE", help="image files or folders of them")
    p.add_argument("--json", action="store_true", help="print JSON (a list, one object per image)")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image")
    add_ctx(p)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("export", help="export backbone + head as PREFIX-symbol.json / PREFIX-0000.params, "
                                      "or a model archive for MXNet Model Server (--mar)")
    p.add_argument("--run", type=non_empty, help="a trained Xvision run")
    p.add_argument("--model", type=non_empty, help="a torchxrayvision port (with --mar), e.g. densenet121-res224-all")
    p.add_argument("--weights", type=non_empty, help="weights file for --model (default: the registry's)")
    p.add_argument("--out", type=non_empty, metavar="PREFIX")
    p.add_argument("--mar", type=non_empty, metavar="OUT.mar",
                   help="write a model archive for `mxvision serve` / MXNet Model Server instead")
    p.add_argument("--dtype", default=None, choices=["float32", "int8"],
                   help="float32: export the portable float32 backbone even for a bfloat16/int8 run; "
                        "int8 (--mar): require the run's INT8 backbone, or, with --model, pack "
                        "`classify --dtype int8`'s checked INT8 network "
                        "(default: the precision its features were extracted with; float32 for --model)")
    p.add_argument("--calibration", type=non_empty, default=None, metavar="INDEX_OR_FOLDER",
                   help="--model with --dtype int8: films to calibrate and check on, as classify takes them")
    p.add_argument("--int8-tolerance", type=positive_float(1.0), default=None, metavar="SCORE",
                   help="--model with --dtype int8: largest score difference to float32 accepted (default: 0.02)")
    add_ctx(p)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("models", help="list the registered networks with their input, outputs and licence")
    p.add_argument("--family", type=non_empty, default=None, help="only this family (e.g. xrv, xrv-other)")
    p.add_argument("--names", action="store_true", help="only the names, one per line")
    p.set_defaults(func=_cmd_models)
