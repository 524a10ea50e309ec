"""CLI commands that check what a model looks at, one per module of :mod:`mxvision.audit`.

* ``explain`` (:mod:`~mxvision.audit.explain`, :mod:`~mxvision.audit.localization`): Grad-CAM or
  saliency overlays, or a pointing game against known nodule positions;
* ``audit`` (:mod:`~mxvision.audit.shortcuts`): trivial baselines next to a model's AUC;
* ``synth`` (:mod:`~mxvision.audit.lesion`): the lesion-insertion check's test set, real normal
  films with and without a simulated nodule, which ``explain --index`` and ``mxvision detector``
  score. The detector has its own group (``cli/detector.py``): it trains a model.
"""
from pathlib import Path

from mxvision.cli.common import (add_ctx, add_range, non_empty, non_negative_float, positive_float,
                                 positive_int, probability, seed, Number, MAX_INT)
from mxvision.cli.output import TSV_HELP, print_json, print_tsv

#: Nodule sizes and contrasts ``synth`` and ``detector train`` take: a radius (in pixels of a
#: 512 px film) up to half the film, a contrast up to the whole grey scale.
nodule_radius = positive_float(high=256.0)
nodule_contrast = positive_float(high=255.0)
#: ``audit --cv K``: none (0) or at least two folds.
cv_folds = Number(int, "must be 0 (no cross-validation) or an integer of at least 2", low=2,
                  high=MAX_INT, allowed=(0,))


def _cmd_explain(args):
    from mxvision.errors import MxvisionError
    from mxvision.audit.explain import explain_files, explainer_from_run, explainer_from_xrv

    if bool(args.run) == bool(args.model):
        raise MxvisionError("explain", "give exactly one of --run RUN or --model NAME")
    if bool(args.images) == bool(args.index):
        raise MxvisionError("explain", "give IMAGE files or --index CSV (pointing game), not both")
    explainer = (explainer_from_run(args.run, ctx=args.ctx) if args.run else
                 explainer_from_xrv(args.model, weights=args.weights, ctx=args.ctx))
    if args.index:
        return _pointing_game(explainer, args)
    results = explain_files(explainer, args.images, args.out, method=args.method, target=args.target,
                            alpha=args.alpha, strict=args.strict)
    failed = sum("error" in r for r in results)
    if args.json:
        print_json(results)
    else:
        print(f"model: {explainer.description}")
        for r in results:
            if "error" in r:
                print_tsv(r["path"], "ERROR", r["error"])
            else:
                peak = "none (empty map)" if r["peak"] is None else f"({r['peak'][0]}, {r['peak'][1]})"
                print_tsv(r["path"], f"{r['method']} for {r['target']} (logit {r['logit']:.3f}), "
                                     f"peak at {peak}", f"-> {r['overlay']}")
    return 1 if failed else 0


def _pointing_game(explainer, args):
    from mxvision.audit.localization import pointing_game_on_index
    from mxvision.features.extract import load_index
    from mxvision.utils import write_json

    split = None if args.split == "all" else args.split
    r = pointing_game_on_index(explainer, load_index(args.index), split=split, method=args.method,
                               target=args.target, tolerance=args.tolerance)
    if args.json:
        print_json(r)
    else:
        print(f"model: {explainer.description}")
        print(f"pointing game ({r['method']}, split {args.split}): {r['hits']}/{r['n']} maxima within "
              f"the nodule radius + {r['tolerance']:g} px = hit rate {r['hit_rate']:.3f}; chance "
              f"(uniform point in the estimated lung) {r['chance_rate']:.3f}")
    if args.out_json:
        write_json(args.out_json, r)
    return 0


def _cmd_audit(args):
    from mxvision.audit.shortcuts import format_audit, run_shortcut_audit

    report = run_shortcut_audit(index=args.index, features=args.features, metrics=args.metrics,
                                model_auc=args.model_auc, split=args.split,
                                train_split=args.train_split, margin=args.margin, cv=args.cv,
                                out=args.out)
    if args.json:
        print_json(report)
        return 0
    for line in format_audit(report):
        print(line)
    for name, r in report.get("cross_validated", {}).items():
        print(f"  {name:<10} {args.cv}-fold CV over all {r['n']} images: AUC {r['auc_mean']:.3f} "
              f"+- {r['auc_sd']:.3f}")
    if args.out:
        print(f"written: {args.out}")
    return 0


def _cmd_synth(args):
    from mxvision.audit.lesion import make_lesion_pairs

    from mxvision.errors import MxvisionError

    if args.segmenter_weights and args.lung_masks != "pspnet":
        raise MxvisionError("--segmenter-weights", "only with --lung-masks pspnet (the estimated masks use no model)")
    lung_masks = None
    if args.lung_masks == "pspnet":
        from mxvision.segmentation import lung_mask_provider
        lung_masks = lung_mask_provider(weights=args.segmenter_weights, progress=not args.quiet)
        print(f"lung masks: {lung_masks.description}")
    index = make_lesion_pairs(args.index, args.out, variants=args.variants, radius=tuple(args.radius),
                              contrast=tuple(args.contrast), seed=args.seed, label=args.label,
                              splits=args.splits, progress=not args.quiet, lung_masks=lung_masks)
    counts = {}
    for split, label in zip(index.splits, index.labels):
        counts[(split, label)] = counts.get((split, label), 0) + 1
    summary = ", ".join(f"{s}: {counts.get((s, 'normal'), 0)} without / {counts.get((s, 'nodule'), 0)} with"
                        for s in ("train", "val", "test") if (s, "normal") in counts)
    nominal = sum(v == "nominal" for v in index.column("lung_mask"))
    print(f"{len(index)} images in {Path(args.out) / 'index.csv'} ({summary})")
    if nominal:
        print(f"note: no lung found in {nominal} film(s); their nodules use the nominal lung geometry")


def add_parsers(sub):
    """The model-checking commands: explain, audit, synth."""
    p = sub.add_parser("explain", help="Grad-CAM / saliency overlay PNGs for images, or a "
                                       "pointing game against known nodule positions",
                       description="Grad-CAM / saliency overlays for image files or folders (one "
                                   "line per image after the model line: PATH, what was explained "
                                   f"(or ERROR), the overlay (or the error); {TSV_HELP}), or a "
                                   "pointing game against known nodule positions (--index).")
    p.add_argument("images", type=non_empty, nargs="*", metavar="IMAGE", help="image files or folders of them")
    p.add_argument("--run", type=non_empty, help="a trained (or fine-tuned) Xvision run folder")
    p.add_argument("--model", type=non_empty,
                   help="a torchxrayvision model name (18 outputs), e.g. densenet121-res224-all")
    p.add_argument("--weights", type=non_empty, default=None,
                   help="with --model: none (random) or a local .pt/.params (default: published weights)")
    p.add_argument("--method", choices=["gradcam", "saliency"], default="gradcam")
    p.add_argument("--target", type=non_empty, default=None,
                   help="class or pathology to explain (default: nodule / Nodule, else the top class)")
    p.add_argument("--out", type=non_empty, default="explain",
                   help="folder for <stem>_<method>.png (default: explain)")
    p.add_argument("--alpha", type=probability, default=0.45, help="heatmap opacity at its maximum, 0 to 1")
    p.add_argument("--json", action="store_true")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image")
    p.add_argument("--index", type=non_empty, help="instead of IMAGEs: an index CSV with nodule coordinates "
                                                   "(JSRT's or synth's) for a pointing game")
    p.add_argument("--split", type=non_empty, default="test",
                   help="with --index: split to use, or 'all' (default test)")
    p.add_argument("--tolerance", type=non_negative_float(), default=0.0,
                   help="with --index: pixels added to the nodule radius for a hit")
    p.add_argument("--out-json", type=non_empty, help="with --index: write the per-image results here")
    add_ctx(p)
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser("audit", help="trivial shortcut baselines (histogram, thumbnails, metadata) "
                                     "on a run's split, next to the model's AUC")
    p.add_argument("--index", type=non_empty, help="index CSV (keeps metadata columns)")
    p.add_argument("--features", type=non_empty, help="feature store folder (its items and splits)")
    p.add_argument("--metrics", type=non_empty,
                   help="an evaluate metrics.json: gives the model AUC (and features)")
    p.add_argument("--model-auc", type=probability, default=None, help="the model's AUC, 0 to 1")
    p.add_argument("--split", type=non_empty, default="test", help="split the baselines are scored on")
    p.add_argument("--train-split", type=non_empty, default="train", help="split the baselines are trained on")
    p.add_argument("--margin", type=probability, default=0.05,
                   help="warn when the model does not beat the best baseline by this AUC (0 to 1)")
    p.add_argument("--cv", type=cv_folds, default=0, metavar="K",
                   help="also K-fold (K >= 2) patient-grouped CV over all images (steadier on small "
                        "splits; default 0: none)")
    p.add_argument("--out", type=non_empty, help="write the report as JSON here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_audit)

    p = sub.add_parser("synth", help="insert simulated nodules into real normal films: paired "
                                     "with/without-nodule set + index CSV")
    p.add_argument("--index", type=non_empty, required=True, help="index CSV (or class folders) with normal films")
    p.add_argument("--out", type=non_empty, required=True, help="output folder (images/ and index.csv)")
    p.add_argument("--variants", type=positive_int(), default=1, help="nodule versions per film (default 1)")
    add_range(p, "--radius", nodule_radius, default=[7.0, 20.0],
              help="nodule radius in pixels of a 512 px film (scaled to each image; up to 256)")
    add_range(p, "--contrast", nodule_contrast, default=[15.0, 40.0],
              help="grey levels (of 255) added at the nodule centre")
    p.add_argument("--label", type=non_empty, default="normal", help="label of the source films (default normal)")
    p.add_argument("--splits", nargs="+", choices=["train", "val", "test"], default=None,
                   help="only films of these splits (default: all; their split is kept)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--lung-masks", choices=["estimated", "pspnet"], default="estimated",
                   help="where nodules may go: each film's estimated lung mask (default), or the lungs "
                        "(Left + Right Lung) segmented by torchxrayvision's ChestX-Det PSPNet")
    p.add_argument("--segmenter-weights", type=non_empty, default=None, metavar="PATH|none",
                   help="with --lung-masks pspnet: a local .pth/.params instead of the published weights "
                        "(downloaded once); none: random weights (testing only)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_synth)
