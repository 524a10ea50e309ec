"""OpenI / Indiana University chest X-rays: reports, labels, views and the index CSV.

The collection (3,955 radiology reports, 7,470 images) is published as two archives,
``NLMCXR_reports.tgz`` (one XML per report) and ``NLMCXR_png.tgz`` (the images, named by image
id, e.g. ``CXR1_1_IM-0001-3001.png``). Each report XML holds:

* ``<uId id="CXR1"/>`` -- the report (study) id; the DICOM ``Patient ID`` of its images is the
  same number, and it is the finest patient grouping the de-identified data allows, so it is the
  ``patient_id`` here;
* ``<MeSH><major>...</major><automatic>...</automatic></MeSH>`` -- the annotators' MeSH-based
  codes (``normal`` or ``Descriptor/qualifier/...``) and the terms MTI extracted automatically;
* ``<parentImage id="CXR1_1_IM-0001-3001">`` -- one per image (frontal and lateral films of
  the study; some reports have none).

Reports are parsed with ``defusedxml`` straight from the archive (nothing is extracted), each
member read with a size cap. The same records can come from three other places, so every route
ends in the same :class:`Report` list (:func:`load_reports` picks by file type):

* a folder of extracted XML files;
* the original Xvision label file ``xvision_datas.json`` (``{"1": {"items": [...major terms],
  "type": "Major", "img": ".../CXR10_IM-0002-1001.png"}, ...}``, one entry per image);
* the records of :mod:`mxvision.data.openi_scrape` (``openi_records.jsonl``, one API record per
  image with ``uid``, ``image_id``, ``major``, ``minor``).

Views come from ``nlmcxr_dicom_metadata.csv.gz`` (the DICOM headers of the collection, as
shipped with torchxrayvision): column ``View Position``. It is empty for 2,586 of the 7,469
images (a whole scanner's worth); those have an unknown view and are left out by the default
``views=PA`` filter.
"""
import csv
import io
import json
import logging
import os
import re
import zlib
from dataclasses import dataclass, field
from typing import Tuple

import numpy as np
from tqdm import tqdm

from mxvision.errors import BadIndex, DownloadError, one_line
from mxvision.io.archive import (MAX_TABLE_BYTES, READ_ERRORS, NotAnArchive, open_tar,
                                 read_decompressed)
from mxvision.data import labels as L
from mxvision.data.dataset import XrayDataset, find_images
from mxvision.data.index import write_index
from mxvision.data.views import normalize_view, parse_views

log = logging.getLogger(__name__)

REPORTS_ARCHIVE = "NLMCXR_reports.tgz"
IMAGES_ARCHIVE = "NLMCXR_png.tgz"
METADATA_FILE = "nlmcxr_dicom_metadata.csv.gz"
IMAGES_DIR = "NLMCXR_png"  # where the PNG archive is extracted by default
MAX_REPORT_BYTES = 1 << 20  # the largest real report is ~10 KB
#: Caps on a report archive: the real one declares 23,848,960 bytes in 3,956 members.
MAX_REPORTS_ARCHIVE_BYTES = 256 << 20
MAX_REPORTS_MEMBERS = 100_000
_IMAGE_ID = re.compile(r"^(CXR\d+)_")


@dataclass(frozen=True)
class Report:
    """One OpenI report: id (``CXR<n>``), MeSH terms, image ids and the report text."""

    uid: str
    major: Tuple[str, ...] = ()
    automatic: Tuple[str, ...] = ()
    images: Tuple[str, ...] = ()
    findings: str = ""
    impression: str = ""
    minor: Tuple[str, ...] = field(default=())  # only the search API returns minor terms


def uid_of_image(image_id):
    """``'CXR10_IM-0002-1001'`` -> ``'CXR10'`` (the report, i.e. patient, an image belongs to)."""
    match = _IMAGE_ID.match(image_id)
    return match.group(1) if match else ""


def _text(node):
    return " ".join("".join(node.itertext()).split()) if node is not None else ""


def parse_report(data, name="report"):
    """Parse one report XML (bytes) into a :class:`Report`; BadIndex names ``name`` if invalid."""
    from defusedxml import ElementTree as DET

    try:
        root = DET.fromstring(data)
    except Exception as err:  # ParseError, DTDForbidden, EntitiesForbidden, ...
        raise BadIndex(name, f"not a readable OpenI report XML ({' '.join(str(err).split())})") \
            from None
    uid_node = root.find("uId")
    uid = uid_node.get("id", "") if uid_node is not None else ""
    if not uid:
        stem = os.path.splitext(os.path.basename(name))[0]
        uid = f"CXR{stem}" if stem.isdigit() else ""
    if not uid:
        raise BadIndex(name, "report has no <uId id=...>")
    mesh = root.find("MeSH")
    major = _clean(e.text or "" for e in (mesh.findall("major") if mesh is not None else []))
    automatic = _clean(e.text or "" for e in (mesh.findall("automatic") if mesh is not None
                                              else []))
    images = tuple(e.get("id") for e in root.iter("parentImage") if e.get("id"))
    sections = {(e.get("Label") or "").upper(): _text(e) for e in root.iter("AbstractText")}
    return Report(uid, major, automatic, images, sections.get("FINDINGS", ""),
                  sections.get("IMPRESSION", ""))


def _sort_key(report):
    digits = re.sub(r"\D", "", report.uid)
    return (int(digits) if digits else 0, report.uid)


def read_reports_archive(path, progress=False):
    """Every report in ``NLMCXR_reports.tgz`` (read in memory, never extracted), sorted by id.

    The archive is checked whole first (:func:`mxvision.io.archive.open_tar`: every header, the
    end-of-archive block, the gzip/xz/bz2 checksums, at most MAX_REPORTS_ARCHIVE_BYTES declared
    and MAX_REPORTS_MEMBERS members), so a damaged archive never yields part of the reports."""
    path = os.fspath(path)
    reports = []
    try:
        with open_tar(path, MAX_REPORTS_ARCHIVE_BYTES, MAX_REPORTS_ARCHIVE_BYTES,
                      MAX_REPORTS_MEMBERS) as (tf, members):
            members = [m for m in members if m.isreg() and m.name.endswith(".xml")]
            for m in tqdm(members, desc="reports", unit="report", disable=not progress,
                          leave=False):
                if m.size > MAX_REPORT_BYTES:
                    raise BadIndex(path, f"member {m.name} is {m.size} bytes, too large for a report")
                try:
                    data = tf.extractfile(m).read()
                except READ_ERRORS as err:
                    raise BadIndex(path, f"truncated or corrupt archive at {m.name} "
                                         f"({one_line(err)})") from None
                reports.append(parse_report(data, f"{path}:{m.name}"))
    except NotAnArchive as err:
        raise BadIndex(path, f"{err.problem}; expected NLMCXR_reports.tgz, a folder of report XML "
                             f"files, xvision_datas.json or scraped .jsonl records") from None
    except DownloadError as err:
        raise BadIndex(path, err.problem) from None
    if not reports:
        raise BadIndex(path, "no report XML files in the archive")
    return sorted(reports, key=_sort_key)


def read_reports_folder(folder, progress=False):
    """Every ``*.xml`` report under ``folder`` (e.g. an extracted ``ecgen-radiology/``)."""
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(folder) for f in names
                   if f.endswith(".xml"))
    if not files:
        raise BadIndex(folder, "no report XML files in the folder")
    reports = []
    for f in tqdm(files, desc="reports", unit="report", disable=not progress, leave=False):
        if os.path.getsize(f) > MAX_REPORT_BYTES:
            raise BadIndex(f, "too large for a report")
        with open(f, "rb") as fh:
            reports.append(parse_report(fh.read(), f))
    return sorted(reports, key=_sort_key)


def _clean(terms):
    """Terms as the archive parser gives them: inner blanks collapsed, empty ones dropped."""
    return tuple(" ".join(str(t).split()) for t in terms if str(t).strip())


def _group_images(entries, source):
    """[(image_id, major, minor)] -> Reports grouped by report id (image order kept)."""
    by_uid = {}
    for image_id, major, minor in entries:
        uid = uid_of_image(image_id)
        if not uid:
            raise BadIndex(source, f"image id {_short(image_id)} is not an OpenI id (CXR<n>_...)")
        rep = by_uid.setdefault(uid, {"major": _clean(major), "minor": _clean(minor),
                                      "images": []})
        if image_id not in rep["images"]:
            rep["images"].append(image_id)
    return sorted((Report(uid, r["major"], (), tuple(r["images"]), minor=r["minor"])
                   for uid, r in by_uid.items()), key=_sort_key)


def _str_list(value):
    return isinstance(value, list) and all(isinstance(x, str) for x in value)


def _short(value, limit=60):
    """A value quoted for an error message, cut so a hostile 5 MB field gives a short line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


def read_xvision_json(path):
    """Reports from the original Xvision label file (``xvision_datas.json``).

    Its ``items`` are the report's major MeSH terms (checked: identical to the archive's for all
    7,469 images it lists, up to blanks) and ``img`` names the image; one entry per image.
    """
    entries = []
    for key, value in _load_json(path).items():
        if not isinstance(value, dict) or not isinstance(value.get("img"), str) \
                or not _str_list(value.get("items")):
            raise BadIndex(path, f"entry {_short(key)} is not an Xvision record "
                                 "({items: [str], type, img: str})")
        image_id = os.path.splitext(value["img"].rstrip("/").rsplit("/", 1)[-1])[0]
        entries.append((image_id, list(value["items"]), []))
    if not entries:
        raise BadIndex(path, "no records")
    return _group_images(entries, path)


def read_scraped(path):
    """Reports from the search-API records written by :func:`~mxvision.data.openi_scrape.scrape`
    (JSON lines with ``image_id``, ``major``, ``minor``)."""
    entries = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise TypeError("not a JSON object")
                major, minor = rec.get("major", []), rec.get("minor", [])
                if not isinstance(rec.get("image_id"), str) or not _str_list(major) \
                        or not _str_list(minor):
                    raise TypeError("image_id must be a string, major/minor lists of strings")
                entries.append((rec["image_id"], major, minor))
    except (ValueError, KeyError, TypeError, RecursionError) as err:
        raise BadIndex(path, f"line {n}: not a scraped OpenI record ({err})") from None
    except OSError as err:
        raise BadIndex(path, f"cannot read ({err.strerror or err})") from None
    if not entries:
        raise BadIndex(path, "no records")
    return _group_images(entries, path)


def _load_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise BadIndex(path, "no such file") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise BadIndex(path, f"not valid JSON ({str(err)[:80]})") from None
    if not isinstance(data, dict):
        raise BadIndex(path, "expected a JSON object")
    return data


def load_reports(source, progress=False):
    """Reports from a report archive (.tgz), a folder of XML files, one XML file, the original
    ``xvision_datas.json`` or scraped ``*.jsonl`` records -- chosen by what ``source`` is."""
    source = os.fspath(source)
    if os.path.isdir(source):
        return read_reports_folder(source, progress)
    if not os.path.exists(source):
        raise BadIndex(source, "no such report archive, folder or file")
    lower = source.lower()
    if lower.endswith(".jsonl"):
        return read_scraped(source)
    if lower.endswith(".json"):
        return read_xvision_json(source)
    if lower.endswith(".xml"):
        with open(source, "rb") as f:
            return [parse_report(f.read(), source)]
    return read_reports_archive(source, progress)


def read_metadata(path):
    """``{image_id: {"view": normalised, "view_raw": ..., "photometric": ...}}`` from
    ``nlmcxr_dicom_metadata.csv(.gz)``."""
    path = os.fspath(path)
    try:  # plain or gzipped, through a cap on the decompressed size (the real one: 5.3 MB)
        with io.StringIO(read_decompressed(path, MAX_TABLE_BYTES, error=BadIndex).decode("utf-8"),
                         newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "imageid" not in reader.fieldnames \
                    or "View Position" not in reader.fieldnames:
                raise BadIndex(path, "expected the OpenI DICOM metadata CSV (columns imageid, "
                                     "View Position)")
            return {row["imageid"]: {"view": normalize_view(row["View Position"]),
                                     "view_raw": row["View Position"],
                                     "photometric": row.get("Photometric Interpretation", "")}
                    for row in reader}
    except FileNotFoundError:
        raise BadIndex(path, "no such metadata file") from None
    except (OSError, EOFError, UnicodeDecodeError, csv.Error, zlib.error) as err:
        raise BadIndex(path, f"unreadable metadata CSV ({err})") from None


def openi_dataset(reports, images=None, metadata=None, synonyms=None, check_images=True):
    """An :class:`XrayDataset` with one row per image of ``reports``.

    ``images``: folder holding the PNGs (searched recursively); with ``check_images`` the rows
    whose PNG is not there are dropped (``dataset.missing`` counts them). Without a folder the
    paths point at ``NLMCXR_png/<image_id>.png`` relative to the current folder. ``metadata``:
    the dict of :func:`read_metadata` (views), or None (views unknown).
    """
    metadata = metadata or {}
    rows, vectors, normal = [], [], []
    for rep in reports:
        vec = L.pathology_vector(rep.major, rep.automatic, synonyms=synonyms)
        xv, xv_orig = L.xvision_label(rep.major), L.original_xvision_label(rep.major)
        for image_id in rep.images:
            meta = metadata.get(image_id, {})
            rows.append({"path": image_id + ".png", "patient_id": rep.uid,
                         "view": meta.get("view", ""), "image_id": image_id,
                         "report_id": rep.uid, "mesh_major": "|".join(rep.major),
                         "mesh_automatic": "|".join(rep.automatic),
                         "xvision": xv or "", "xvision_original": xv_orig or ""})
            vectors.append(vec)
            normal.append(L.is_normal(rep.major))
    folder = os.path.abspath(images) if images else os.path.abspath(IMAGES_DIR)
    missing = 0
    if images and check_images:
        found = find_images(folder, [r["path"] for r in rows])
        keep = [i for i, r in enumerate(rows) if r["path"] in found]
        missing = len(rows) - len(keep)
        for r in rows:
            r["path"] = found.get(r["path"], "")
        rows = [rows[i] for i in keep]
        vectors = [vectors[i] for i in keep]
        normal = [normal[i] for i in keep]
    else:
        for r in rows:
            r["path"] = os.path.join(folder, r["path"])
    labels = np.array(vectors, dtype=np.float32).reshape(len(rows), len(L.PATHOLOGIES))
    ds = XrayDataset(rows, L.PATHOLOGIES, labels, normal, name="openi", root=folder)
    ds.missing = missing
    return ds


def default_metadata(reports_path):
    """``nlmcxr_dicom_metadata.csv(.gz)`` beside the reports, if there is one."""
    folder = os.path.dirname(os.path.abspath(reports_path))
    for name in (METADATA_FILE, METADATA_FILE[:-3]):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def openi_index(reports, out_csv, images=None, metadata=None, task="nodule", views=None,
                seed=0, val=0.15, test=0.15, synonyms=None, progress=False, view_predictor=None):
    """Write the index CSV of OpenI for ``task`` and return ``(index, info)``.

    ``reports``: anything :func:`load_reports` reads. ``images``: the PNG folder (rows without a
    PNG there are dropped); default ``NLMCXR_png/`` beside ``out_csv``, not checked. ``metadata``:
    the DICOM metadata CSV for views; default: the one beside ``reports``; needed unless
    ``views`` is ``all`` or ``view_predictor`` predicts the views it does not give
    (:meth:`~mxvision.data.dataset.XrayDataset.with_predicted_views`). ``info`` has the counts
    a user wants to see.
    """
    out_csv = os.path.abspath(os.fspath(out_csv))
    metadata = metadata or default_metadata(reports)
    if metadata is None and parse_views(views) is not None and view_predictor is None:
        raise BadIndex(reports, f"views are needed for --views {views or 'PA'} but no "
                                f"{METADATA_FILE} was given or found beside the reports; pass "
                                f"--metadata FILE or --views all, or --view-model to predict them")
    report_list = load_reports(reports, progress=progress)
    meta = read_metadata(metadata) if metadata else {}
    if synonyms is not None and not isinstance(synonyms, dict):
        synonyms = L.load_synonyms(synonyms)
    default_images = os.path.join(os.path.dirname(out_csv), IMAGES_DIR)
    ds = openi_dataset(report_list, images=images or default_images, metadata=meta,
                       synonyms=synonyms, check_images=images is not None)
    if len(ds) == 0:
        raise BadIndex(images or reports, f"none of the {ds.missing} images of the reports is in "
                                          f"this folder (expected <image id>.png, e.g. "
                                          f"CXR1_1_IM-0001-3001.png)")
    index = ds.to_index(task=task, views=views, seed=seed, val=val, test=test,
                        source=os.fspath(reports), view_predictor=view_predictor)
    write_index(index, out_csv)
    info = {"reports": len(report_list), "images": len(ds) + ds.missing,
            "images_missing": ds.missing, "indexed": len(index),
            "patients": len(set(index.patient_ids))}
    return index, info


__all__ = ["Report", "parse_report", "load_reports", "read_reports_archive", "read_reports_folder",
           "read_xvision_json", "read_scraped", "read_metadata", "openi_dataset", "openi_index",
           "uid_of_image", "find_images", "REPORTS_ARCHIVE", "IMAGES_ARCHIVE", "METADATA_FILE"]
