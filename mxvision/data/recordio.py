"""Preprocessed images packed into MXNet RecordIO (read back by :mod:`mxvision.data.record_reader`).

Decoding a 2048x2048 PNG and resizing it takes far longer than the network needs for a 224 px
input, and every extraction run repeats it. :func:`pack_index` does the image work once: each
image of an index is read (:func:`~mxvision.io.images.read_image`), centre-cropped and resized to
the preset's size (:func:`~mxvision.data.transforms.center_crop_resize`), quantised to uint8 and
written with its label into ``NAME.rec`` + ``NAME.idx`` (``mx.recordio.MXIndexedRecordIO``,
record key = row number). Beside them:

* ``NAME.json`` -- the manifest: size, encoding, classes, and per record the source path, id,
  label, patient, split and view; written last, so a pack without it is unfinished;
* ``NAME.csv`` -- an index CSV whose paths are ``NAME.rec#<key>`` and which keeps every column
  of the source index (plus ``source_path``), so the pipeline can read the pack like any index.

:func:`~mxvision.data.record_reader.load_image` is a drop-in for :func:`mxvision.data.transforms.load_image`: a path
``FILE.rec#KEY`` is read from the pack, any other path from the file. The result has the same
shape and normalisation; it differs from the file route only by the uint8 quantisation of the
[0, 1] image (at most 0.5/255 before normalisation, <= 0.0088 after ImageNet normalisation).
A pack serves presets of its own size only; another size needs another pack.

Records are PNG-encoded by default (lossless for uint8; ``raw`` skips even that decode, at a
little more disk). Packing resumes: records of an interrupted run are copied, not recomputed.
"""
import datetime
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
from tqdm import tqdm

from mxvision.data import transforms
from mxvision.data.record_reader import (ENCODINGS, FORMAT, VERSION, check_record_header,
                                         decode_record, pack_paths, record_limit)
from mxvision.errors import BadImage, BadIndex, BadRun
from mxvision.utils import write_json

log = logging.getLogger(__name__)

_CHUNK = 64  # images prepared per round of the worker threads


# ----------------------------------------------------------------------------------- encoding
def _encode(img_u8, encoding):
    if encoding == "raw":
        return img_u8.tobytes()
    if encoding == "png":
        ok, buf = cv2.imencode(".png", img_u8, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    else:
        ok, buf = cv2.imencode(".jpg", img_u8, [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {img_u8.shape} image as {encoding}")
    return buf.tobytes()


def quantize(img01):
    """[0, 1] float image -> uint8 (round to nearest)."""
    return np.rint(np.clip(img01, 0.0, 1.0) * 255.0).astype(np.uint8)


def prepare_record(path, size, encoding):
    """Read + crop/resize + quantise + encode one image; (payload, None) or (None, BadImage).

    The per-image work of :func:`pack_index` (run on its worker threads): the one step a resumed
    pack skips for the records it copies.
    """
    try:
        from mxvision.io.images import read_image
        img = transforms.center_crop_resize(read_image(path), size)
        return _encode(quantize(img), encoding), None
    except BadImage as err:
        return None, err


# ----------------------------------------------------------------------------------- packing
def _label_vectors(index):
    """Per row the record label: the pathology vector when the index has pathology columns,
    else the class id. Returns (labels, description)."""
    from mxvision.data.labels import PATHOLOGIES, parse_value

    patho = [c for c in index.columns if c in PATHOLOGIES]
    if patho:
        rows = [[parse_value(v) for v in vals] for vals in zip(*(index.column(c) for c in patho))]
        return [np.asarray(r, dtype=np.float32) for r in rows], {"pathologies": patho}
    return [float(i) for i in index.label_ids], {"class_id": list(index.classes)}


def _config(index, size, encoding, preset):
    return {"format": FORMAT, "version": VERSION, "size": size, "dtype": "uint8",
            "channels": 1, "crop": "center_crop_resize", "encoding": encoding,
            "preset": preset.name, "classes": list(index.classes),
            "sources": [[i, p, lab] for i, p, lab in zip(index.ids, index.paths, index.labels)]}


def _copy_resumable(part_rec, part_idx, state_path, config, writer, size, encoding):
    """Copy the intact records of an interrupted pack with the same config into ``writer``
    (MXNet's writer cannot append); return the set of keys copied."""
    import mxnet as mx  # imported lazily: reading an index never needs MXNet

    try:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return set()
    if state.get("config") != config or not (os.path.isfile(part_rec)
                                             and os.path.isfile(part_idx)):
        return set()
    try:
        old = mx.recordio.MXIndexedRecordIO(part_idx, part_rec, "r")
    except Exception:  # noqa: BLE001 - unreadable leftovers: start over
        return set()
    done, fd = set(), os.open(part_rec, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        for k in list(old.keys):
            try:
                check_record_header(fd, old.idx[k], record_limit(size, encoding), part_rec)
                payload = old.read_idx(k)
                decode_record(mx.recordio.unpack(payload)[1], encoding, size, part_rec)
            except Exception:  # noqa: BLE001 - a torn record (the last one, usually)
                continue
            writer.write_idx(k, payload)
            done.add(k)
    finally:
        old.close()
        os.close(fd)
    return done


def _same_file(a, b):
    try:
        return a is not None and os.path.samefile(a, b)
    except (OSError, TypeError):  # either missing, or not a path
        return False


def pack_index(index, out_rec, preset="imagenet224", encoding="png", workers=2, strict=False,
               progress=True, overwrite=False):
    """Pack every image of ``index`` (an :class:`~mxvision.data.index.Index` or CSV path) into
    ``out_rec`` (+ .idx, .json, .csv); return the manifest dict.

    Unreadable images are skipped and listed in the manifest (``strict`` raises instead). An
    existing finished pack of the same index and settings is kept as is (nothing is redone)
    unless ``overwrite``; an interrupted one is resumed.
    """
    from mxvision.data.index import Index, read_index, write_index

    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
    if not isinstance(index, Index):
        index = read_index(index)
    if len(index) == 0:
        raise BadIndex(index.source, "no images to pack")
    preset = transforms.get_preset(preset)
    rec, idx, manifest_path, csv_path = pack_paths(out_rec)
    source = getattr(index, "source", None)
    if _same_file(source, csv_path):  # the pack writes its index of records as NAME.csv
        raise BadRun(csv_path, "is the index being packed, and the pack would overwrite it with its "
                               f"index of records; choose another --out (e.g. {rec[:-4]}-pack.rec)")
    size = preset.size
    config = _config(index, size, encoding, preset)
    if not overwrite and os.path.isfile(manifest_path) and os.path.isfile(rec):
        try:
            with open(manifest_path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = {}
        if old.get("config") == config:
            log.info("%s already holds this pack; nothing to do", rec)
            return old
        raise BadRun(rec, "holds another pack (other images or settings); choose another --out "
                          "or pass --overwrite")
    part_rec, part_idx, state_path = rec + ".part", idx + ".part", rec + ".part.json"
    try:
        os.makedirs(os.path.dirname(rec), exist_ok=True)
    except OSError as err:
        raise BadRun(os.path.dirname(rec), f"cannot create the folder ({err.strerror})") from None
    labels, label_kind = _label_vectors(index)
    paths = index.paths
    import mxnet as mx  # imported lazily: reading an index never needs MXNet

    writer = mx.recordio.MXIndexedRecordIO(part_idx + ".new", part_rec + ".new", "w")
    skipped = []
    try:
        done = set() if overwrite else _copy_resumable(part_rec, part_idx, state_path, config,
                                                       writer, size, encoding)
        if done:
            log.info("resuming %s: %d of %d records already packed", rec, len(done), len(index))
        writer.fidx.flush()
        os.replace(part_rec + ".new", part_rec)  # the open writer keeps writing to the same file
        os.replace(part_idx + ".new", part_idx)
        write_json(state_path, {"config": config})
        rows = [r for r in range(len(index)) if r not in done]
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
                tqdm(total=len(index), initial=len(done), unit="img", desc="pack",
                     disable=not progress) as bar:
            for start in range(0, len(rows), _CHUNK):
                chunk = rows[start:start + _CHUNK]
                results = pool.map(lambda r: prepare_record(paths[r], size, encoding), chunk)
                for r, (payload, err) in zip(chunk, results):
                    if err is not None:
                        if strict:
                            raise err
                        skipped.append({"row": r, "id": index.ids[r], "problem": str(err)})
                    else:
                        label = labels[r]
                        flag = label.size if isinstance(label, np.ndarray) else 0
                        header = mx.recordio.IRHeader(flag, label, r, 0)
                        writer.write_idx(r, mx.recordio.pack(header, payload))
                    bar.update(1)
                writer.fidx.flush()
    finally:
        writer.close()

    bad = {s["row"] for s in skipped}
    if len(bad) == len(index):
        raise BadIndex(index.source, f"none of the {len(index)} images could be read, first: "
                                     f"{skipped[0]['problem']}")
    items = [{"key": k, "id": i, "source": p, "label": lab, "patient_id": pid, "split": s,
              "view": v}
             for k, (i, p, lab, pid, s, v) in enumerate(zip(
                 index.ids, paths, index.labels, index.patient_ids, index.splits, index.views))
             if k not in bad]
    manifest = {"config": config, "label_kind": label_kind, "count": len(items),
                "skipped": skipped, "items": items, "source_index": index.source,
                "created": datetime.datetime.now().isoformat(timespec="seconds")}
    for stale in (manifest_path, csv_path):
        if os.path.exists(stale):
            os.remove(stale)
    os.replace(part_rec, rec)
    os.replace(part_idx, idx)
    name = os.path.basename(rec)
    records = []
    for k, r in enumerate(index.records()):
        if k in bad:
            continue
        r["source_path"] = r["path"]
        r["path"] = os.path.join(os.path.dirname(rec), f"{name}#{k}")
        records.append(r)
    packed = Index(records, os.path.dirname(rec), columns=index.columns + ("source_path",),
                   classes=index.classes, source=csv_path)
    write_index(packed, csv_path)
    write_json(manifest_path, manifest)  # last: its presence marks a finished pack
    os.remove(state_path)
    if skipped:
        log.warning("skipped %d unreadable image(s); they are listed in %s", len(skipped),
                    manifest_path)
    return manifest


__all__ = ["pack_index", "prepare_record", "quantize"]
