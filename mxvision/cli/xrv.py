"""``mxvision classify``: torchxrayvision's 18 pathology scores for chest X-ray files.

The MXNet counterpart of torchxrayvision's ``scripts/process_image.py``: one table (pathologies
down, images across) or JSON. Outputs the chosen weights were not trained on, and -- with
calibration -- trained outputs without an operating point (torchxrayvision returns a constant
0.5 for both), are marked instead of printed as if they were scores.
"""
from pathlib import Path

from mxvision.cli.common import add_ctx, non_empty, positive_int
from mxvision.cli.output import TSV_HELP, print_json, tsv_field

NAME_WIDTH = 28


def _cmd_classify(args):
    from mxvision.inference import classify
    from mxvision.models.xrv.common import DEFAULT_PATHOLOGIES
    results = classify(args.images, model=args.model, weights=args.weights,
                       calibrated=not args.no_calibration, ctx=args.ctx, batch_size=args.batch_size,
                       strict=args.strict, root=args.cache, progress=not args.quiet)
    if args.json:
        print_json(results)
    else:
        _print_table(results, DEFAULT_PATHOLOGIES)
    return 1 if any("error" in r for r in results) else 0


def _print_table(results, pathologies):
    ok = [r for r in results if "error" not in r]
    for r in results:
        if "error" in r:
            print(f"ERROR\t{tsv_field(r['error'])}")
    if not ok:
        return
    first = ok[0]
    kind = "calibrated (op_threshs)" if first["calibrated"] else "uncalibrated (sigmoid)"
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
    """The torchxrayvision commands: classify."""
    from mxvision.models.xrv.common import list_weights
    p = sub.add_parser("classify", help="18 pathology scores with a torchxrayvision model (like process_image.py)",
                       description="18 pathology scores with a torchxrayvision model: a table "
                                   "(pathologies down, images across; an 'ERROR<tab>message' line "
                                   "per unreadable file first) or --json. File names and messages "
                                   f"are escaped as in a TSV: {TSV_HELP.split('; ', 1)[1]}.")
    p.add_argument("images", type=non_empty, nargs="+", metavar="IMAGE",
                   help="PNG/JPEG/DICOM files or folders of them")
    p.add_argument("--model", default="densenet121-res224-all", choices=list_weights(),
                   help="torchxrayvision weights name (default: densenet121-res224-all)")
    p.add_argument("--weights", type=non_empty, default=None, metavar="PATH",
                   help="a local torchxrayvision .pt (or converted .params) for the chosen architecture "
                        "instead of downloading the published weights")
    p.add_argument("--no-calibration", action="store_true",
                   help="skip op_threshs: print sigmoid probabilities instead of calibrated scores")
    p.add_argument("--json", action="store_true", help="print JSON (one object per image)")
    p.add_argument("--batch-size", type=positive_int(), default=1)
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image")
    p.add_argument("--cache", type=non_empty, default=None, metavar="DIR",
                   help="weights cache folder (default: $MXVISION_CACHE/models or ~/.mxnet/models)")
    p.add_argument("--quiet", action="store_true", help="no download progress bar")
    add_ctx(p)
    p.set_defaults(func=_cmd_classify)
