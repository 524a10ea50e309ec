"""``mxvision detector``: train, evaluate and apply the from-scratch nodule detector.

The lesion-insertion check's mode that sees nodules (``docs/EVALUATION.md`` (c)): trained on
nodules inserted into the train-split normal films of an index, evaluated on a with/without-nodule
set from ``mxvision synth`` made from films it never saw.
"""
from pathlib import Path

from mxvision.cli.audit import nodule_contrast, nodule_radius
from mxvision.cli.common import (add_ctx, add_range, non_empty, non_negative_float, non_negative_int,
                                 positive_float, positive_int, seed)
from mxvision.cli.output import TSV_HELP, print_json, print_tsv


def _cmd_train(args):
    from mxvision.audit.detector import DEFAULTS, train_detector

    settings = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None}
    settings["tta"] = not args.no_tta
    state = train_detector(args.index, args.out, ctx=args.ctx, resume=not args.no_resume,
                           progress=not args.quiet, keep_checkpoints=args.keep_checkpoints,
                           stop_at=args.stop_at, **settings)
    if not state["history"]:
        return 0
    best = next(r for r in state["history"] if r["step"] == state["best_step"])
    done = state["last_step"] >= settings.get("steps", DEFAULTS["steps"])
    print(f"{'finished' if done else 'paused at'} step {state['last_step']}; best step {best['step']}: "
          f"val AUC {best['val_auc']:.3f}, paired {best['val_paired_auc']:.3f}"
          + (f", threshold {state['threshold']:.4f}" if state.get("threshold") is not None else "")
          + f"; detector in {args.out}")
    return 0


def _cmd_evaluate(args):
    from mxvision.audit.detector_evaluation import evaluate_detector

    out = args.out or str(Path(args.run) / f"eval-{args.split}")
    m = evaluate_detector(args.run, args.pairs, split=None if args.split == "all" else args.split,
                          out_dir=out, ctx=args.ctx, params=args.params, resamples=args.bootstrap)
    if args.json:
        print_json(m)
        return 0
    ci = m.get("ci95", {})
    fmt = lambda key: f" (95% CI {ci[key][0]:.3f}-{ci[key][1]:.3f}, by film)" if key in ci else ""  # noqa
    print(f"{m['split']}: {m['n_images']} images ({m['n_nodule']} with / {m['n_clean']} without a nodule) "
          f"from {m['n_films']} films")
    print(f"AUC {m['auc']:.3f}{fmt('auc')}; paired AUC {m['paired_auc']:.3f}{fmt('paired_auc')}")
    if "confusion_matrix" in m:
        (tn, fp), (fn, tp) = m["confusion_matrix"]
        print(f"at the val threshold {m['threshold']['value']:.4f}: sensitivity {m['sensitivity']:.3f} "
              f"({tp}/{tp + fn}), specificity {m['specificity']:.3f} ({tn}/{tn + fp})")
    for name, key in (("contrast", "by_contrast"), ("radius@512", "by_radius_512")):
        print(f"AUC by {name}: " + ", ".join(f"{b['range'][0]:g}-{b['range'][1]:g}: {b['auc']:.3f} "
                                             f"(n={b['n']})" for b in m[key]))
    p = m["pointing"]
    if p["n"]:
        print(f"pointing game: {p['hits']}/{p['n']} evidence maxima within the nodule radius")
    print(f"written: {Path(out) / 'metrics.json'}, {Path(out) / 'scores.csv'}")
    return 0


def _cmd_score(args):
    from mxvision.audit.detector_evaluation import score_image_files

    result = score_image_files(args.run, args.images, ctx=args.ctx, params=args.params,
                               strict=args.strict, out=args.out)
    threshold = result["threshold"]
    for row in result["rows"]:
        s, p = row["score"], row["peak"]
        flag = [] if threshold is None else ["nodule" if s >= threshold else "no nodule"]
        print_tsv(row["id"], f"{s:.4f}", *flag, f"peak ({p[0]}, {p[1]})")
    for err in result["skipped"]:
        print_tsv(f"skipped: {err}")
    return 1 if result["skipped"] else 0


def add_parsers(sub):
    """The ``detector`` command group: train, evaluate, score."""
    group = sub.add_parser("detector", help="a nodule detector trained from scratch on nodules inserted "
                                            "into normal films (the lesion-insertion check)")
    cmds = group.add_subparsers(dest="detector_command", metavar="SUBCOMMAND")
    cmds.required = True

    p = cmds.add_parser("train", help="train on the train-split normal films of an index; select on val")
    p.add_argument("--index", type=non_empty, required=True,
                   help="index CSV (e.g. JSRT's) with normal films and splits")
    p.add_argument("--out", type=non_empty, required=True, help="run folder (rerun the same command to resume)")
    for name, kind, text in (
            ("steps", positive_int(), "training steps (default 1500)"),
            ("size", positive_int(), "input size in px, a multiple of 8 from 32 (default 256)"),
            ("width", positive_int(), "channels of the first layer, a multiple of 16 (default 16)"),
            ("extra", non_negative_int(), "extra dilated layers at 1/8 resolution (default 2)"),
            ("batch_pairs", positive_int(), "films per step, each with and without a nodule (default 8)"),
            ("lr", positive_float(), "peak Adam learning rate (default 0.002; warm-up then cosine)"),
            ("pos_weight", positive_float(), "weight of nodule cells in the dense loss (default 50)"),
            ("augment", non_negative_float(), "strength of the paired warp + gamma augmentation "
                                              "(default 1; 0: none)"),
            ("val_variants", positive_int(), "nodule versions per val film for model selection (default 10)"),
            ("checkpoint_every", positive_int(), "steps between checkpoints + val scoring (default 250)"),
            ("seed", seed, "seed of initialisation, nodules and val pairs (default 0)")):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None, help=text)
    add_range(p, "--radius", nodule_radius, help="nodule radius in px of a 512 px film (default 7 20, as synth)")
    add_range(p, "--contrast", nodule_contrast, help="nodule contrast in grey levels (default 15 40, as synth)")
    p.add_argument("--backgrounds", choices=["normal", "all"], default=None,
                   help="films nodules are inserted into: normal (default) or all, i.e. also the "
                        "train-split films with a real nodule, whose nodule is left out of the loss")
    p.add_argument("--no-tta", action="store_true", help="score without the mirrored image")
    p.add_argument("--stop-at", type=positive_int(), default=None, help="checkpoint and stop after this step")
    p.add_argument("--keep-checkpoints", type=non_negative_int(), default=2,
                   help="newest step checkpoints kept (0: all)")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--quiet", action="store_true")
    add_ctx(p)
    p.set_defaults(func=_cmd_train)

    p = cmds.add_parser("evaluate", help="AUC, paired AUC (film-bootstrap CI), confusion matrix at the "
                                         "val threshold, by contrast/radius, on a synth index")
    p.add_argument("--run", type=non_empty, required=True, help="a detector run folder")
    p.add_argument("--pairs", type=non_empty, required=True, help="the index.csv `mxvision synth` wrote")
    p.add_argument("--split", type=non_empty, default="test", help="split to score, or 'all' (default test)")
    p.add_argument("--out", type=non_empty, default=None,
                   help="folder for metrics.json + scores.csv (default RUN/eval-SPLIT)")
    p.add_argument("--params", type=non_empty, default="best",
                   help="best (selected on val), last, or a .params file")
    p.add_argument("--bootstrap", type=non_negative_int(), default=2000, help="film-bootstrap resamples (0: none)")
    p.add_argument("--json", action="store_true")
    add_ctx(p)
    p.set_defaults(func=_cmd_evaluate)

    p = cmds.add_parser("score", help="nodule score and evidence peak of image files",
                        description="Nodule score and evidence peak of image files or folders: one "
                                    "line per image, PATH, score, [nodule / no nodule at the val "
                                    f"threshold,] peak; then one 'skipped: ...' line per unreadable "
                                    f"file; {TSV_HELP}.")
    p.add_argument("images", type=non_empty, nargs="+", metavar="IMAGE", help="image files or folders of them")
    p.add_argument("--run", type=non_empty, required=True, help="a detector run folder")
    p.add_argument("--out", type=non_empty, default=None, help="also write the scores as CSV here")
    p.add_argument("--params", type=non_empty, default="best")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image")
    add_ctx(p)
    p.set_defaults(func=_cmd_score)
