"""CLI commands of the Xvision pipeline: each parses its arguments and calls the Python API."""
import json


def _add_ctx(p):
    p.add_argument("--ctx", default="auto", help="auto (GPU if MXNet sees one), cpu, gpu or gpu:N")


def _cmd_demo(args):
    from mxvision.demo import run_demo
    run_demo(args.out, n_per_class=args.n_per_class, seed=args.seed, epochs=args.epochs,
             weights=args.weights, ctx=args.ctx, progress=not args.quiet)


def _cmd_extract(args):
    from mxvision.features.extract import extract_features
    store = extract_features(args.index, args.out, backbone=args.backbone, cut=args.cut,
                             weights=args.weights, preset=args.preset, ctx=args.ctx,
                             batch_size=args.batch_size,
                             shard_size=args.shard_size, allow_random=args.allow_random_weights,
                             strict=args.strict, overwrite=args.overwrite, progress=not args.quiet,
                             dtype=args.dtype, calibration=args.calibration,
                             storage_dtype=args.storage_dtype, pooled=args.pooled)
    m = store.manifest
    print(f"{m['n_features']} feature maps {tuple(m['feature_shape'])} in {store.path} "
          f"({m['n_skipped']} skipped); weights: {m['weights']['description']}; computed in "
          f"{m['dtype']}, stored as {m['storage_dtype']}{', pooled' if m['pooled'] else ''}")
    if m["n_skipped"] and args.strict:
        return 1


def _cmd_train(args):
    from mxvision.train.loop import train_head
    state = train_head(args.features, args.out, epochs=args.epochs, lr=args.lr,
                       batch_size=args.batch_size, momentum=args.momentum, seed=args.seed,
                       ctx=args.ctx, resume=not args.no_resume, progress=not args.quiet,
                       keep_checkpoints=args.keep_checkpoints)
    best = next(r for r in state["history"] if r["epoch"] == state["best_epoch"])
    print(f"best epoch {best['epoch']}: val accuracy {best['val_accuracy']:.3f}, "
          f"val AUC {best['val_auc']:.3f}; run in {args.out}")


def _cmd_evaluate(args):
    from mxvision.evaluate import evaluate_run
    r = evaluate_run(args.run, args.features, args.out, split=args.split, ctx=args.ctx,
                     audit=not args.no_audit)
    print(f"{r['split']}: n={r['n']} accuracy {r['accuracy']:.4f} AUC {r['auc']:.4f} "
          f"confusion matrix {r['confusion_matrix']} (rows: true {r['classes']})")
    print(f"metrics: {args.out}/metrics.json  confusion matrix: {r['confusion_matrix_png']}")
    audit = r.get("shortcut_audit") or {}
    if audit.get("message"):
        print(f"shortcut audit: {audit['message']}")


def _cmd_predict(args):
    from mxvision.predict import predict
    results = predict(args.run, args.images, ctx=args.ctx, strict=args.strict)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if "error" in r:
                print(f"{r['path']}\tERROR\t{r['error']}")
            else:
                probs = "  ".join(f"{c}={p:.4f}" for c, p in r["probabilities"].items())
                print(f"{r['path']}\t{r['predicted']}\t{probs}")
    return 1 if any("error" in r for r in results) else 0


def _cmd_export(args):
    from mxvision.export import export_model
    paths = export_model(args.run, args.out, ctx=args.ctx, dtype=args.dtype)
    print(f"exported {paths['symbol']} and {paths['params']} (metadata: {paths['meta']})")


def _cmd_models(args):
    from mxvision.models import zoo
    for name in zoo.list_models():
        print(name)


def add_parsers(sub):
    """The pipeline commands: demo, extract, train, evaluate, predict, export, models."""
    p = sub.add_parser("demo", help="run the whole pipeline on generated radiographs (no downloads)")
    p.add_argument("--out", default="mxvision-demo", help="output folder (default: mxvision-demo)")
    p.add_argument("--n-per-class", type=int, default=40)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", choices=["imagenet", "none"], default=None,
                   help="default: ImageNet if already cached, random otherwise")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_ctx(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("extract", help="extract backbone features for an index CSV or class folders")
    p.add_argument("--index", required=True, help="index CSV (path,label[,patient_id,split,view]) or a folder per class")
    p.add_argument("--out", required=True, help="feature store folder")
    p.add_argument("--backbone", default="resnet50_v2")
    p.add_argument("--cut", default="stage4_unit2_relu1", help="layer whose output is the feature")
    p.add_argument("--weights", default="imagenet", help="imagenet | none (random) | PATH to a .params file")
    p.add_argument("--allow-random-weights", action="store_true",
                   help="continue with random weights when ImageNet weights cannot be had")
    p.add_argument("--preset", default=None, help="preprocessing preset (imagenet224, xrv224, xrv512; "
                   "default: the backbone's own)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=256, help="images per feature shard file")
    p.add_argument("--strict", action="store_true", help="fail on the first unreadable image instead of skipping it")
    p.add_argument("--overwrite", action="store_true", help="discard features of another configuration in --out")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8"],
                   help="compute precision; bfloat16 and int8 (calibrated, oneDNN/VNNI) run on the CPU "
                        "only (default: float32)")
    p.add_argument("--calibration", default=None, metavar="INDEX_OR_FOLDER",
                   help="--dtype int8: images to calibrate on (index CSV or folder; default: a seeded "
                        "sample of 64 of the images being extracted)")
    p.add_argument("--storage-dtype", default="float32", choices=["float32", "float16"],
                   help="dtype of the stored features; float16 halves the disk (default: float32)")
    p.add_argument("--pooled", action="store_true",
                   help="store the global average of each feature map (2048 values, not 2048x7x7)")
    p.add_argument("--quiet", action="store_true")
    _add_ctx(p)
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser("train", help="train the Xvision head on a feature store")
    p.add_argument("--features", required=True)
    p.add_argument("--out", required=True, help="run folder (checkpoints, logs, curves)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (original: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", action="store_true", help="start over even if --out holds checkpoints")
    p.add_argument("--keep-checkpoints", type=int, default=3,
                   help="epoch checkpoints to keep (~200 MB each for the ResNet-50 head; 0 = all)")
    p.add_argument("--quiet", action="store_true")
    _add_ctx(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="metrics, confusion matrix and ROC curve on a held-out split")
    p.add_argument("--run", required=True)
    p.add_argument("--features", default=None, help="default: the feature store the run was trained on")
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--no-audit", action="store_true",
                   help="skip the shortcut audit (trivial image baselines on the same split)")
    _add_ctx(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="class probabilities for images or folders of images")
    p.add_argument("--run", required=True)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--json", action="store_true")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image")
    _add_ctx(p)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("export", help="export backbone + head as PREFIX-symbol.json / PREFIX-0000.params")
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True, metavar="PREFIX")
    p.add_argument("--dtype", default=None, choices=["float32"],
                   help="float32: export the portable float32 backbone even for a bfloat16/int8 run "
                        "(default: the precision its features were extracted with)")
    _add_ctx(p)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("models", help="list the registered networks")
    p.set_defaults(func=_cmd_models)


