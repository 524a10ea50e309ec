"""NIH ChestX-ray14: the official label table, bounding boxes, and the index CSV.

``Data_Entry_2017_v2020.csv`` (plain or gzipped) has one row per image: ``Image Index``,
``Finding Labels`` (``Cardiomegaly|Effusion`` or ``No Finding``), ``Follow-up #``, ``Patient ID``,
``Patient Age``, ``Patient Gender``, ``View Position`` (PA/AP) and the original size and pixel
spacing. Its header spells two columns with a comma inside brackets
(``OriginalImage[Width,Height]``), which a CSV reader splits into two: the columns are therefore
read by position after the first seven, not by those names.

``BBox_List_2017.csv`` gives 984 boxes (``Image Index``, ``Finding Label``, ``x, y, w, h`` in
pixels of the 1024x1024 image) whose header has the same problem (``Bbox [x,y,w,h]`` + three
empty names). Boxes are attached to their image as JSON in a ``bboxes`` column:
``[["Nodule", x, y, w, h], ...]``.

Patients: ``Patient ID`` (30,805 of them, up to 184 follow-up films each) written as the 8-digit
prefix of the file names, so the splits group all follow-ups of a patient.
"""
import csv
import io
import json
import os
import zlib

import numpy as np

from mxvision.errors import BadIndex
from mxvision.io.archive import MAX_TABLE_BYTES, read_decompressed
from mxvision.data import labels as L
from mxvision.data.dataset import XrayDataset, find_images
from mxvision.data.index import write_index

DATA_ENTRY = "Data_Entry_2017_v2020.csv"
BBOX_LIST = "BBox_List_2017.csv"
_FIRST_COLUMNS = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
                  "Patient Gender", "View Position")


def _open_text(path):
    """The table as text, plain or gzipped, read through a cap on its decompressed size (the real
    Data_Entry table is 9.0 MB; a gzip bomb is refused at MAX_TABLE_BYTES, not parsed)."""
    data = read_decompressed(path, MAX_TABLE_BYTES, error=BadIndex)
    return io.StringIO(data.decode("utf-8-sig"), newline="")


def _rows(path, what):
    try:
        with _open_text(path) as f:
            return list(csv.reader(f))
    except FileNotFoundError:
        raise BadIndex(path, "no such file") from None
    except (OSError, EOFError, UnicodeDecodeError, csv.Error, zlib.error) as err:
        raise BadIndex(path, f"unreadable {what} ({err})") from None


def read_data_entry(path):
    """The rows of ``Data_Entry_2017*.csv`` as dicts with normalised keys: ``image``,
    ``findings``, ``follow_up``, ``patient_id`` (8 digits), ``age``, ``sex``, ``view``,
    ``width``, ``height``, ``spacing_x``, ``spacing_y``."""
    rows = _rows(path, "NIH label table")
    if not rows or [h.strip() for h in rows[0][:7]] != list(_FIRST_COLUMNS):
        raise BadIndex(path, f"not the NIH Data_Entry table (expected the columns "
                             f"{', '.join(_FIRST_COLUMNS)})")
    out = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) < 7:
            raise BadIndex(path, f"line {line}: {len(row)} fields, expected at least 7")
        image, findings, follow, pid, age, sex, view = (c.strip() for c in row[:7])
        rest = [c.strip() for c in row[7:11]] + [""] * (4 - len(row[7:11]))
        try:
            pid = "%08d" % int(pid)
        except ValueError:
            raise BadIndex(path, f"line {line}: Patient ID {pid!r} is not a number") from None
        out.append({"image": image, "findings": findings, "follow_up": follow,
                    "patient_id": pid, "age": age, "sex": sex, "view": view,
                    "width": rest[0], "height": rest[1], "spacing_x": rest[2],
                    "spacing_y": rest[3]})
    if not out:
        raise BadIndex(path, "no images listed")
    return out


def read_bboxes(path):
    """``{image: [[label, x, y, w, h], ...]}`` from ``BBox_List_2017.csv``."""
    rows = _rows(path, "NIH box list")
    if not rows or [h.strip() for h in rows[0][:2]] != ["Image Index", "Finding Label"]:
        raise BadIndex(path, "not the NIH BBox_List table (Image Index, Finding Label, x, y, w, h)")
    boxes = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        try:
            x, y, w, h = (float(v) for v in row[2:6])
        except ValueError:
            raise BadIndex(path, f"line {line}: box {row[2:6]} is not four numbers") from None
        boxes.setdefault(row[0].strip(), []).append(
            [row[1].strip(), round(x, 2), round(y, 2), round(w, 2), round(h, 2)])
    return boxes


def nih_dataset(data_entry, images, bbox_csv=None):
    """An :class:`XrayDataset` of the NIH images present under ``images`` (searched
    recursively: the official layout is ``images_001/images/*.png``...).

    Labels: the 14 NIH findings 1/0, the other four torchxrayvision pathologies NaN; ``normal``
    is ``No Finding``. ``dataset.missing`` counts the listed images not found.
    """
    rows = read_data_entry(data_entry)
    found = find_images(images, [r["image"] for r in rows])
    boxes = read_bboxes(bbox_csv) if bbox_csv else {}
    records, vectors, normal = [], [], []
    for r in rows:
        path = found.get(r["image"])
        if path is None:
            continue
        rec = {"path": path, "patient_id": r["patient_id"], "view": r["view"],
               "finding_labels": r["findings"], "follow_up": r["follow_up"], "age": r["age"],
               "sex": r["sex"], "view_position": r["view"]}
        if bbox_csv:
            rec["bboxes"] = json.dumps(boxes[r["image"]]) if r["image"] in boxes else ""
        findings = {f.strip() for f in r["findings"].split("|")}
        rec["xvision"] = ("nodule" if "Nodule" in findings
                          else "normal" if findings == {L.NIH_NO_FINDING} else "")
        unknown = findings - set(L.NIH_FINDINGS) - {L.NIH_NO_FINDING}
        if unknown:
            raise BadIndex(data_entry, f"{r['image']}: unknown finding(s) {', '.join(unknown)}")
        records.append(rec)
        vectors.append(L.nih_vector(r["findings"]))
        normal.append(findings == {L.NIH_NO_FINDING})
    labels = np.array(vectors, dtype=np.float32).reshape(len(records), len(L.PATHOLOGIES))
    ds = XrayDataset(records, L.PATHOLOGIES, labels, normal, name="nih",
                     root=os.path.abspath(images))
    ds.missing = len(rows) - len(records)
    return ds


def default_bboxes(data_entry):
    folder = os.path.dirname(os.path.abspath(data_entry))
    for name in (BBOX_LIST + ".gz", BBOX_LIST):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def nih_index(data_entry, images, out_csv, task="nodule", views=None, bbox_csv=None, seed=0,
              val=0.15, test=0.15, view_predictor=None):
    """Write the index CSV of the NIH images under ``images``; return ``(index, info)``.

    ``bbox_csv`` defaults to ``BBox_List_2017.csv(.gz)`` beside the label table, if present.
    ``view_predictor`` fills views the table does not give (see ``XrayDataset.with_predicted_views``).
    """
    if not os.path.isdir(images):
        raise BadIndex(images, "no such image folder")
    ds = nih_dataset(data_entry, images, bbox_csv or default_bboxes(data_entry))
    if len(ds) == 0:
        raise BadIndex(images, f"none of the {ds.missing} images listed in {data_entry} is in "
                               f"this folder (expected e.g. 00000001_000.png)")
    index = ds.to_index(task=task, views=views, seed=seed, val=val, test=test,
                        source=os.fspath(data_entry), view_predictor=view_predictor)
    write_index(index, out_csv)
    info = {"listed": len(ds) + ds.missing, "images_found": len(ds), "indexed": len(index),
            "patients": len(set(index.patient_ids))}
    return index, info


__all__ = ["read_data_entry", "read_bboxes", "nih_dataset", "nih_index", "DATA_ENTRY",
           "BBOX_LIST"]
