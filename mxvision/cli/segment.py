"""``mxvision segment``: anatomical masks of chest films (torchxrayvision's ChestX-Det PSPNet).

For each film, a folder ``OUT/<stem>/`` with one mask PNG per structure (uint8, 255 inside, at the
film's own size: ``Left_Lung.png``...) and ``overlay.png``; for all films ``OUT/segmentation.json``
and ``OUT/areas.csv`` (area fraction per structure). See :mod:`mxvision.segmentation`.
"""
import os

from mxvision.cli.common import add_ctx, non_empty, open_probability
from mxvision.cli.output import TSV_HELP, print_tsv, tsv_field


def _cmd_segment(args):
    from mxvision.segmentation import write_segmentations

    summary = write_segmentations(args.images, args.out, model=args.model, weights=args.weights,
                                  threshold=args.threshold, ctx=args.ctx, strict=args.strict, root=args.cache,
                                  progress=not args.quiet)
    films = summary["films"]
    failed = [f for f in films if "error" in f]
    print(f"model {summary['model']}, sigmoid > {summary['threshold']:g}; weights: {summary['weights']}")
    for film in films:
        if "error" in film:
            print_tsv(film["path"], "ERROR", film["error"])
        else:
            lungs = sum(film["area_fraction"].get(n, 0.0) for n in ("Left Lung", "Right Lung"))
            print_tsv(film["path"], f"{len(summary['structures'])} masks + overlay at {film['width']}x"
                                    f"{film['height']} (lungs {lungs:.1%} of the square)", f"-> {film['folder']}")
    where = os.path.abspath(args.out)
    print(f"{len(films) - len(failed)} films segmented, {len(failed)} unreadable; area fractions in "
          f"{tsv_field(os.path.join(where, 'segmentation.json'))} and {tsv_field(os.path.join(where, 'areas.csv'))}")
    return 1 if failed else 0


def add_parsers(sub):
    """The segmentation command."""
    from mxvision.segmentation import DEFAULT_SEGMENTER, DEFAULT_THRESHOLD
    p = sub.add_parser(
        "segment", help="anatomical masks of chest films (14 structures: lungs, heart, clavicles...)",
        description="Segment chest films with torchxrayvision's ChestX-Det PSPNet: for each film a folder "
                    "OUT/<stem>/ with one mask PNG per structure (uint8 0/255 at the film's own size, "
                    "named like Left_Lung.png) and overlay.png (all masks on the film); "
                    "OUT/segmentation.json and OUT/areas.csv give each structure's area as a fraction of "
                    "the centred square the model sees. One line per film after the model line: PATH, "
                    f"what was written (or ERROR), the folder (or the error); {TSV_HELP}.")
    p.add_argument("images", type=non_empty, nargs="+", metavar="IMAGE",
                   help="PNG/JPEG/DICOM files or folders of them")
    p.add_argument("--out", type=non_empty, required=True, metavar="DIR", help="folder to write the masks in")
    p.add_argument("--model", type=non_empty, default=DEFAULT_SEGMENTER,
                   help="segmentation model (default: %(default)s)")
    p.add_argument("--weights", type=non_empty, default=None, metavar="PATH|none",
                   help="a local torchxrayvision .pth (or converted .params) instead of downloading the "
                        "published weights; none: random weights (for testing only)")
    p.add_argument("--threshold", type=open_probability, default=DEFAULT_THRESHOLD,
                   help="a pixel is inside a structure where its sigmoid probability is above this "
                        "(default: %(default)s)")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image")
    p.add_argument("--cache", type=non_empty, default=None, metavar="DIR",
                   help="weights cache folder (default: $MXVISION_CACHE/models or ~/.mxnet/models)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_ctx(p)
    p.set_defaults(func=_cmd_segment)
