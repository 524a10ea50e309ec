"""The JSRT chest radiograph set (Normal vs Nodule) as an index.

The folder holds ``labels.csv`` (filename, label, patient_id, nodule subtlety, size, age, sex,
nodule position in the 2048 and 512 grids, diagnosis, ...) and ``images/``. All JSRT films are PA
views with one image per patient. Every column of labels.csv except ``filename`` is kept, so later
code can use the nodule coordinates (``nodule_x_512``, ``nodule_y_512``) and subtlety.

Beware (measured on this set): nodule and non-nodule films differ in acquisition, so image-level
AUC on JSRT alone does not show that a model sees nodules.
"""
import csv
import os

from mxvision.errors import BadIndex
from mxvision.data.index import Index, write_index
from mxvision.data.splits import assign_splits

LABELS_FILE = "labels.csv"
IMAGES_DIR = "images"
JSRT_LABELS = ("normal", "nodule")


def read_jsrt(root, check_files=True):
    """An :class:`Index` of a JSRT folder (``root/labels.csv`` + ``root/images/``), view ``PA``.

    The index's root is ``root``, so image ids are ``images/<filename>``. With ``check_files``
    (default) every listed image must exist.
    """
    root = os.path.abspath(os.fspath(root))
    labels_csv = os.path.join(root, LABELS_FILE)
    try:
        with open(labels_csv, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = [h.strip() for h in reader.fieldnames or []]
    except FileNotFoundError:
        raise BadIndex(labels_csv, "no such file; expected a JSRT folder with labels.csv and "
                                   "images/") from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise BadIndex(labels_csv, f"not a readable CSV ({err})") from None
    missing = [c for c in ("filename", "label", "patient_id") if c not in header]
    if missing:
        raise BadIndex(labels_csv, f"missing column(s) {', '.join(missing)}")
    records = []
    for line, row in enumerate(rows, start=2):
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
        if row["label"] not in JSRT_LABELS:
            raise BadIndex(labels_csv, f"line {line}: label {row['label']!r} is not normal or "
                                       f"nodule")
        if not row["filename"]:
            raise BadIndex(labels_csv, f"line {line}: empty filename")
        rec = {"path": os.path.join(root, IMAGES_DIR, row.pop("filename")),
               "label": row.pop("label"), "patient_id": row.pop("patient_id"), "view": "PA"}
        rec.update(row)
        records.append(rec)
    if not records:
        raise BadIndex(labels_csv, "no images listed")
    columns = ("patient_id", "split", "view") + tuple(
        h for h in header if h not in ("filename", "label", "patient_id", "view", "split"))
    index = Index(records, root, columns=columns, source=labels_csv)
    if check_files:
        absent = index.missing()
        if absent:
            raise BadIndex(labels_csv, f"{len(absent)} of {len(index)} listed images missing, "
                                       f"first: {absent[0]}")
    return index


def jsrt_index(root, out_csv, seed=0, val=0.15, test=0.15):
    """Write an index CSV of the JSRT folder with a patient-grouped, label-stratified split;
    return the Index."""
    index = assign_splits(read_jsrt(root), val=val, test=test, seed=seed)
    write_index(index, out_csv)
    return index
