"""``mxvision data ...``: get chest X-ray datasets onto disk and into index CSVs.

    mxvision data download openi --out DIR [--what reports|images|all]
    mxvision data download url URL --out FILE [--sha256 HEX]
    mxvision data scrape openi --out DIR [--delay S] [--images]
    mxvision data index openi --reports NLMCXR_reports.tgz [--images DIR] [--task ...] --out CSV
    mxvision data index jsrt --root DIR --out CSV
    mxvision data index nih --csv Data_Entry_2017_v2020.csv[.gz] --images DIR --out CSV
    mxvision data index folder --root DIR --out CSV
    mxvision data index merge A.csv B.csv ... --out CSV
    mxvision data index ... --views frontal --view-model [WEIGHTS]   (predict unknown views first)
    mxvision data summary CSV
    mxvision data pack CSV --out NAME.rec [--preset imagenet224]

Every command shows progress bars (``--quiet`` hides them), can be rerun after an interruption
to continue (downloads resume, scrapes continue after the last page, packs keep their records)
and reports user mistakes as one line.
"""
import collections
import os

from mxvision.cli.common import (add_check, fraction, hex_digest, non_empty, non_negative_int,
                                 positive_float, positive_int, seconds, seed)
from mxvision.data.openi_download import OPENI_BASE_URL

#: Most retries per request: a thousand waits of doubling length already take longer than a day.
MAX_RETRIES = 1000
#: Most decoding threads ``data pack`` starts.
MAX_WORKERS = 256
#: Largest ``--max-size`` of ``data download url``, in GiB (a pebibyte).
MAX_DOWNLOAD_GIB = 1 << 20


#: ``--sha256`` of the downloads: a checksum, or skip/none to not check one.
sha256 = hex_digest("sha256", 64, skip=("skip", "none"))


def _progress(args):
    return not getattr(args, "quiet", False)


def _add_split_args(p):
    p.add_argument("--seed", type=seed, default=0, help="split seed (default 0)")
    p.add_argument("--val", type=fraction, default=0.15, help="validation fraction (default 0.15)")
    p.add_argument("--test", type=fraction, default=0.15,
                   help="test fraction (default 0.15); val + test must leave some training images")
    add_check(p, _splits_leave_training_images)


def _splits_leave_training_images(args):
    if args.val + args.test >= 1:
        return (f"--val {args.val:g} --test {args.test:g}: the two fractions must add up to less "
                f"than 1 (the rest is the training split)")


def _add_net_args(p):
    p.add_argument("--retries", type=non_negative_int(MAX_RETRIES), default=5,
                   help="retries per request after the first attempt (default 5)")
    p.add_argument("--timeout", type=seconds(zero=False), default=30, help="seconds without progress (30)")
    p.add_argument("--backoff", type=seconds(), default=1.0,
                   help="first wait between retries, doubled each time (default 1 s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


# ----------------------------------------------------------------------------------- download
def _cmd_download_openi(args):
    from mxvision.data.openi import IMAGES_DIR, METADATA_FILE, REPORTS_ARCHIVE
    from mxvision.data.openi_download import download_openi_archive, extract_once, openi_archive_keys

    what = openi_archive_keys(args.what)
    for key in what:
        got = download_openi_archive(key, args.out, base_url=args.base_url, sha256=args.sha256,
                                     retries=args.retries, timeout=args.timeout,
                                     backoff=args.backoff, progress=_progress(args))
        print(f"{got['path']}: {got['bytes']} bytes, sha256 {got['sha256']}"
              f"{' (verified)' if got['verified'] else ' (no known checksum to verify)'}")
        if not args.no_extract:
            _print_extracted(extract_once(got["path"], got["extract_dir"], _progress(args)),
                             got["extract_dir"])
    if "reports" in what:
        print(f"next: mxvision data index openi --reports {os.path.join(args.out, REPORTS_ARCHIVE)}"
              + (f" --images {os.path.join(args.out, IMAGES_DIR)}" if "images" in what else "")
              + f" --metadata {METADATA_FILE} --out openi.csv")


def _cmd_download_url(args):
    from mxvision.data.openi_download import expected_sha256, extract_once
    from mxvision.io.download import download
    from mxvision.utils import file_digest

    download(args.url, args.out, sha1=args.sha1, sha256=expected_sha256(args.sha256),
             retries=args.retries, timeout=args.timeout, backoff=args.backoff,
             progress=_progress(args), resume=True, max_bytes=max(1, int(args.max_size * 2 ** 30)))
    print(f"{args.out}: {os.path.getsize(args.out)} bytes, sha256 {file_digest(args.out, 'sha256')}")
    if args.extract:
        _print_extracted(extract_once(args.out, args.extract, _progress(args)), args.extract)


def _print_extracted(n, folder):
    print(f"  extracted {n} files into {folder}" if n is not None
          else f"  already extracted in {folder}")


# ----------------------------------------------------------------------------------- scrape
def _cmd_scrape_openi(args):
    from mxvision.data.openi_scrape import scrape

    result = scrape(args.out, base_url=args.base_url, query=args.query, coll=args.coll,
                    page_size=args.page_size, delay=args.delay, max_records=args.max_records,
                    images=args.images, retries=args.retries, timeout=args.timeout,
                    backoff=args.backoff, user_agent=args.user_agent, restart=args.restart,
                    progress=_progress(args))
    state = "complete" if result["complete"] else "stopped early; rerun the same command to go on"
    print(f"{result['records']} of {result['total']} records in {result['records_file']} "
          f"({result['pages']} pages, {state})"
          + (f"; {result['images_downloaded']} images downloaded" if args.images else ""))
    print(f"next: mxvision data index openi --reports {result['records_file']} --out openi.csv")


# ----------------------------------------------------------------------------------- index
def _add_view_model(p):
    p.add_argument("--view-model", nargs="?", const="pretrained", default=None, metavar="WEIGHTS",
                   help="before --views selects, predict the view of every film whose metadata has none "
                        "with torchxrayvision's view model xinario-view-resnet50 (FRONTAL or LATERAL; "
                        "recorded in a view_source column); WEIGHTS: a .pt/.params file (default: the "
                        "published weights, downloaded once)")


def _view_predictor(args):
    """The view model of ``--view-model``, loaded (or refused) before any film is indexed."""
    if args.view_model is None:
        return None
    from mxvision.data.views import parse_views
    from mxvision.view_prediction import ViewPredictor

    parse_views(args.views)  # a typo in --views fails before the model is downloaded or read
    return ViewPredictor(weights=None if args.view_model == "pretrained" else args.view_model,
                         progress=_progress(args))


def _report_views(predictor):
    if predictor is None:
        return
    counts = ", ".join(f"{view} {n}" for view, n in sorted(predictor.counts.items())) or "none was unknown"
    unreadable = f"; {len(predictor.unreadable)} unreadable, left unknown" if predictor.unreadable else ""
    print(f"  views predicted by {predictor.model} for films without one: {counts}{unreadable} "
          f"(column view_source; {predictor.weights})")


def _report(index, out, info=None, extra=""):
    counts = collections.Counter(index.labels)
    top = ", ".join(f"{k} {v}" for k, v in counts.most_common(6))
    more = f" (+{len(counts) - 6} more labels)" if len(counts) > 6 else ""
    splits = collections.Counter(index.splits)
    print(f"wrote {len(index)} images of {len(set(index.patient_ids))} patients to {out}: "
          f"{top}{more}; splits train {splits.get('train', 0)} / val {splits.get('val', 0)} / "
          f"test {splits.get('test', 0)}, grouped by patient")
    if info:
        print("  " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in info.items()) + extra)
    print(f"  counts per label and split: mxvision data summary {out}")


def _cmd_index_openi(args):
    from mxvision.data.openi import openi_index

    predictor = _view_predictor(args)
    index, info = openi_index(args.reports, args.out, images=args.images,
                              metadata=args.metadata, task=args.task, views=args.views,
                              seed=args.seed, val=args.val, test=args.test,
                              synonyms=args.synonyms, progress=_progress(args), view_predictor=predictor)
    note = "" if args.images else "; images not checked (no --images)"
    _report(index, args.out, info, note)
    _report_views(predictor)


def _cmd_index_jsrt(args):
    from mxvision.data.jsrt import jsrt_index

    index = jsrt_index(args.root, args.out, seed=args.seed, val=args.val, test=args.test)
    _report(index, args.out)


def _cmd_index_nih(args):
    from mxvision.data.nih import nih_index

    predictor = _view_predictor(args)
    index, info = nih_index(args.csv, args.images, args.out, task=args.task, views=args.views,
                            bbox_csv=args.bbox, seed=args.seed, val=args.val, test=args.test,
                            view_predictor=predictor)
    _report(index, args.out, info)
    _report_views(predictor)


def _cmd_index_folder(args):
    from mxvision.data.dataset import folder_dataset
    from mxvision.data.index import write_index

    predictor = _view_predictor(args)
    ds = folder_dataset(args.root)
    index = ds.to_index(task="pathologies" if args.task == "pathologies" else "nodule",
                        views=args.views, seed=args.seed, val=args.val, test=args.test,
                        source=args.root, view_predictor=predictor) if args.task else \
        ds.folder_labels_index(views=args.views, seed=args.seed, val=args.val, test=args.test,
                               source=args.root, view_predictor=predictor)
    write_index(index, args.out)
    _report(index, args.out)
    _report_views(predictor)


def _cmd_index_merge(args):
    from mxvision.data.dataset import XrayDataset, csv_dataset
    from mxvision.data.index import write_index

    predictor = _view_predictor(args)
    ds = XrayDataset.merge([csv_dataset(c) for c in args.csvs])
    index = ds.to_index(task=args.task, views=args.views, seed=args.seed, val=args.val,
                        test=args.test, root=os.path.dirname(os.path.abspath(args.out)),
                        source=", ".join(args.csvs), view_predictor=predictor)
    write_index(index, args.out)
    _report(index, args.out)
    _report_views(predictor)


# ----------------------------------------------------------------------------------- summary
def _cmd_summary(args):
    from mxvision.data.summary import summary_table
    from mxvision.data.index import read_index
    from mxvision.data.splits import check_no_patient_leak

    index = read_index(args.index)
    print(f"{args.index}: {len(index)} images, {len(set(index.patient_ids))} patients")
    print()
    print(summary_table(index))
    check_no_patient_leak(index)
    print()
    print("no patient is in two splits")


# ----------------------------------------------------------------------------------- pack
def _cmd_pack(args):
    from mxvision.data.record_reader import pack_paths
    from mxvision.data.recordio import pack_index

    manifest = pack_index(args.index, args.out, preset=args.preset, encoding=args.encoding,
                          workers=args.workers, strict=args.strict, progress=_progress(args),
                          overwrite=args.overwrite)
    rec, idx, meta, csv_path = pack_paths(args.out)
    size = os.path.getsize(rec)
    print(f"packed {manifest['count']} images ({manifest['config']['size']} px, "
          f"{manifest['config']['encoding']}, {size / 1e6:.1f} MB) into {rec} + {idx}; "
          f"{len(manifest['skipped'])} skipped")
    print(f"  manifest {meta}; index of the records {csv_path}")


def add_parsers(sub):
    """Register ``data`` with its sub-commands download, scrape, index, summary, pack."""
    from mxvision.data.dataset import TASKS
    from mxvision.data.openi_scrape import DEFAULT_DELAY, USER_AGENT
    from mxvision.data.record_reader import ENCODINGS
    from mxvision.data.transforms import PRESETS

    data = sub.add_parser("data", help="download, scrape, index, summarise and pack datasets",
                          description="Get chest X-ray datasets onto disk and into index CSVs.")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION")
    dsub.required = True
    views_help = ("views to keep: PA, AP, LATERAL, frontal (PA, AP and FRONTAL, a predicted frontal "
                  "view), lateral, unknown, all; comma-separated (default PA)")

    # download
    p = dsub.add_parser("download", help="download (and safely extract) dataset archives")
    psub = p.add_subparsers(dest="source", metavar="SOURCE")
    psub.required = True
    q = psub.add_parser("openi", help="the OpenI archives NLMCXR_reports.tgz / NLMCXR_png.tgz")
    q.add_argument("--out", type=non_empty, required=True, help="folder for the archives")
    q.add_argument("--what", choices=["reports", "images", "all"], default="reports",
                   help="reports (1 MB, default), images (1.3 GB) or all")
    q.add_argument("--base-url", type=non_empty, default=OPENI_BASE_URL, help=f"default {OPENI_BASE_URL}")
    q.add_argument("--sha256", type=sha256, default=None,
                   help="expected sha256 (default: the known one, if any; 'skip' to not check)")
    q.add_argument("--no-extract", action="store_true", help="keep the archives packed")
    _add_net_args(q)
    q.set_defaults(func=_cmd_download_openi)
    q = psub.add_parser("url", help="any file, resumable and verified")
    q.add_argument("url", type=non_empty)
    q.add_argument("--out", type=non_empty, required=True, help="destination file")
    q.add_argument("--sha256", type=sha256, default=None, help="expected sha256 (64 hex digits)")
    q.add_argument("--sha1", type=hex_digest("sha1", 40), default=None, help="expected sha1 (40 hex digits)")
    q.add_argument("--extract", type=non_empty, default=None, metavar="DIR", help="safely extract a tar into DIR")
    q.add_argument("--max-size", type=positive_float(MAX_DOWNLOAD_GIB), default=16.0, metavar="GIB",
                   help="stop (and delete) a download growing past GIB gibibytes (default 16)")
    _add_net_args(q)
    q.set_defaults(func=_cmd_download_url)

    # scrape
    p = dsub.add_parser("scrape", help="page through a search API politely (rate limit, resume)")
    psub = p.add_subparsers(dest="source", metavar="SOURCE")
    psub.required = True
    q = psub.add_parser("openi", help="OpenI's /api/search, the original Xvision route")
    q.add_argument("--out", type=non_empty, required=True, help="folder for openi_records.jsonl and its state")
    q.add_argument("--base-url", type=non_empty, default=OPENI_BASE_URL)
    q.add_argument("--query", default="", help="search words (default: all)")
    q.add_argument("--coll", type=non_empty, default="cxr", help="collection (default cxr: Indiana chest X-rays)")
    q.add_argument("--page-size", type=positive_int(), default=100, help="records per request (default 100)")
    q.add_argument("--delay", type=seconds(), default=DEFAULT_DELAY,
                   help=f"seconds between requests (default {DEFAULT_DELAY})")
    q.add_argument("--max-records", type=positive_int(), default=None, help="stop after about N records")
    q.add_argument("--images", action="store_true", help="also download each 512 px PNG")
    q.add_argument("--user-agent", type=non_empty, default=USER_AGENT, help="how the scraper identifies itself")
    q.add_argument("--restart", action="store_true", help="start over instead of resuming")
    _add_net_args(q)
    q.set_defaults(func=_cmd_scrape_openi)

    # index
    p = dsub.add_parser("index", help="write the index CSV (path,label,patient_id,split,view)")
    psub = p.add_subparsers(dest="source", metavar="SOURCE")
    psub.required = True
    q = psub.add_parser("openi", help="OpenI reports (archive, XML folder, xvision_datas.json, "
                                      "scraped .jsonl)")
    q.add_argument("--reports", type=non_empty, required=True)
    q.add_argument("--images", type=non_empty, default=None, help="folder of the PNGs (rows without one dropped)")
    q.add_argument("--metadata", type=non_empty, default=None,
                   help="nlmcxr_dicom_metadata.csv.gz for views (default: beside --reports)")
    q.add_argument("--task", choices=TASKS, default="nodule",
                   help="nodule (Normal vs Nodule), nodule-original (the original Xvision rule) "
                        "or pathologies (18 torchxrayvision labels)")
    q.add_argument("--views", type=non_empty, default=None, help=views_help)
    q.add_argument("--synonyms", type=non_empty, default=None, help="JSON synonym table replacing the built-in")
    q.add_argument("--out", type=non_empty, required=True)
    q.add_argument("--quiet", action="store_true")
    _add_view_model(q)
    _add_split_args(q)
    q.set_defaults(func=_cmd_index_openi)
    q = psub.add_parser("jsrt", help="JSRT (labels.csv + images/)")
    q.add_argument("--root", type=non_empty, required=True)
    q.add_argument("--out", type=non_empty, required=True)
    _add_split_args(q)
    q.set_defaults(func=_cmd_index_jsrt)
    q = psub.add_parser("nih", help="NIH ChestX-ray14 (Data_Entry_2017_v2020.csv + images)")
    q.add_argument("--csv", type=non_empty, required=True, help="Data_Entry_2017_v2020.csv[.gz]")
    q.add_argument("--images", type=non_empty, required=True, help="image folder (searched recursively)")
    q.add_argument("--bbox", type=non_empty, default=None, help="BBox_List_2017.csv[.gz] (default: beside --csv)")
    q.add_argument("--task", choices=("nodule", "pathologies"), default="nodule")
    q.add_argument("--views", type=non_empty, default=None, help=views_help)
    q.add_argument("--out", type=non_empty, required=True)
    _add_view_model(q)
    _add_split_args(q)
    q.set_defaults(func=_cmd_index_nih)
    q = psub.add_parser("folder", help="class sub-folders (ROOT/<label>/*.png|jpg|dcm)")
    q.add_argument("--root", type=non_empty, required=True)
    q.add_argument("--task", choices=("nodule", "pathologies"), default=None,
                   help="default: the folder names as labels, as they are")
    q.add_argument("--views", type=non_empty, default="all", help=views_help.replace("PA)", "all)"))
    q.add_argument("--out", type=non_empty, required=True)
    _add_view_model(q)
    _add_split_args(q)
    q.set_defaults(func=_cmd_index_folder)
    q = psub.add_parser("merge", help="merge index CSVs of several sources into one")
    q.add_argument("csvs", type=non_empty, nargs="+", metavar="CSV")
    q.add_argument("--task", choices=("nodule", "pathologies"), default="nodule")
    q.add_argument("--views", type=non_empty, default="all", help=views_help.replace("PA)", "all)"))
    q.add_argument("--out", type=non_empty, required=True)
    _add_view_model(q)
    _add_split_args(q)
    q.set_defaults(func=_cmd_index_merge)

    # summary
    p = dsub.add_parser("summary", help="images per label and split, patients, views")
    p.add_argument("index", type=non_empty, help="index CSV")
    p.set_defaults(func=_cmd_summary)

    # pack
    p = dsub.add_parser("pack", help="pack preprocessed images into RecordIO (.rec + .idx)")
    p.add_argument("index", type=non_empty, help="index CSV")
    p.add_argument("--out", type=non_empty, required=True, help="NAME.rec (NAME.idx/.json/.csv beside it)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="imagenet224")
    p.add_argument("--encoding", choices=ENCODINGS, default="png",
                   help="png (lossless, default), raw (fastest to read) or jpg")
    p.add_argument("--workers", type=positive_int(MAX_WORKERS), default=2, help="decoding threads (default 2)")
    p.add_argument("--strict", action="store_true", help="fail on the first unreadable image")
    p.add_argument("--overwrite", action="store_true", help="replace another pack at --out")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_pack)


__all__ = ["add_parsers"]
