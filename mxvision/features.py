"""Feature extraction into a sharded NDArray store with a manifest, resumable.

Layout of a feature store directory::

    manifest.json          what the features are (backbone, weights, cut, preprocessing), the items
                           (id, path, label, patient, split) and each finished shard with its rows,
                           size and sha256
    shard-00000.nd         mx.nd.save({"features": (rows, C, H, W) float32})
    backbone.params        only for random weights: the exact backbone, so predict/export reproduce it

A shard is listed in the manifest only after its file is completely written (temp file + rename),
and it carries a checksum, so an interrupted run resumes by skipping the shards that are listed
and intact.
"""
import datetime
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mxnet as mx
import numpy as np
from tqdm import tqdm

from . import transforms
from .context import parse_ctx
from .data.folder import index_from_folder
from .data.index import read_index
from .data.splits import assign_splits
from .errors import BadImage, BadIndex, BadRun
from .models import zoo
from .utils import atomic_path, file_digest, read_json, write_json

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SPLIT_SEED = 0


def load_index(source):
    """An Index from an index CSV or a folder with one sub-folder per class."""
    if hasattr(source, "paths"):
        return source
    source = Path(source)
    if source.is_dir():
        return index_from_folder(source)
    if not source.exists():
        raise BadIndex(source, "no such index CSV or folder")
    return read_index(source)


def _ensure_splits(index):
    """Give every row a patient-grouped split when the index does not say one."""
    if all(index.splits):
        return index, None
    return assign_splits(index, seed=SPLIT_SEED), {"seed": SPLIT_SEED, "grouped_by": "patient_id"}


def _items(index):
    return [
        {"id": i, "path": str(p), "label": lab, "label_id": int(lid), "patient_id": pid, "split": s}
        for i, p, lab, lid, pid, s in zip(index.ids, index.paths, index.labels, index.label_ids,
                                          index.patient_ids, index.splits)
    ]


class FeatureStore:
    """Read access to a finished (or partial) feature store directory."""

    def __init__(self, path):
        self.path = Path(path)
        manifest_file = self.path / MANIFEST
        if not manifest_file.is_file():
            raise BadRun(self.path, f"not a feature store (no {MANIFEST}); run `mxvision extract` first")
        try:
            self.manifest = read_json(manifest_file)
        except ValueError as err:
            raise BadRun(manifest_file, f"unreadable manifest ({err})") from None
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise BadRun(manifest_file, f"unsupported format_version {self.manifest.get('format_version')}")

    @property
    def classes(self):
        return self.manifest["classes"]

    @property
    def items(self):
        return self.manifest["items"]

    @property
    def feature_shape(self):
        return tuple(self.manifest["feature_shape"])

    @property
    def complete(self):
        return self.manifest.get("complete", False)

    def shard_path(self, shard):
        return self.path / shard["file"]

    def check_shard(self, shard, verify=True):
        """True when a listed shard's file is there with the recorded size (and checksum)."""
        path = self.shard_path(shard)
        if not path.is_file() or path.stat().st_size != shard["bytes"]:
            return False
        return not verify or file_digest(path) == shard["sha256"]

    def load(self, split=None, verify=True):
        """Return ``(features, label_ids, ids)`` for the rows of ``split`` (all rows if None)."""
        if not self.complete:
            raise BadRun(self.path, "feature extraction did not finish; rerun `mxvision extract` to resume")
        wanted = [it["split"] == split or split is None for it in self.items]
        chunks, rows = [], []
        for shard in self.manifest["shards"]:
            if not self.check_shard(shard, verify=verify):
                raise BadRun(self.shard_path(shard), "missing, truncated or corrupt feature shard")
            keep = [k for k, r in enumerate(shard["rows"]) if wanted[r]]
            if not keep:
                continue
            feats = mx.nd.load(str(self.shard_path(shard)))["features"].asnumpy()
            chunks.append(feats[keep])
            rows.extend(shard["rows"][k] for k in keep)
        if not rows:
            raise BadRun(self.path, f"no features for split {split!r}")
        labels = np.array([self.items[r]["label_id"] for r in rows], dtype=np.int64)
        ids = [self.items[r]["id"] for r in rows]
        return np.concatenate(chunks), labels, ids


def _config(index_items, backbone, cut, weights_info, preset, shard_size, classes):
    return {
        "format_version": FORMAT_VERSION,
        "backbone": backbone,
        "cut": cut,
        "weights": weights_info,
        "preprocessing": preset.to_dict(),
        "shard_size": shard_size,
        "classes": classes,
        "items": index_items,
    }


_SAME_RUN_KEYS = ("format_version", "backbone", "cut", "preprocessing", "shard_size", "classes", "items")


def _resume_state(out_dir, config, overwrite):
    """Shards already finished by an earlier run with the same configuration."""
    manifest_file = out_dir / MANIFEST
    if overwrite or not manifest_file.exists():
        return [], []
    old = read_json(manifest_file)
    same = all(old.get(k) == config[k] for k in _SAME_RUN_KEYS) and \
        old.get("weights", {}).get("sha1") == config["weights"]["sha1"]
    if not same:
        raise BadRun(out_dir, "holds features of another index or configuration; "
                              "choose a new --out or pass --overwrite")
    store = FeatureStore(out_dir)
    done = [s for s in old.get("shards", []) if store.check_shard(s)]
    return done, old.get("skipped", [])


def _load_one(path, preset):
    try:
        return transforms.load_image(path, preset), None
    except BadImage as err:
        return None, err


def extract_features(index, out_dir, backbone=zoo.DEFAULT_BACKBONE, cut=zoo.DEFAULT_CUT,
                     weights="imagenet", preset="imagenet224", ctx=None, batch_size=16,
                     shard_size=256, allow_random=False, strict=False, overwrite=False,
                     progress=True, workers=2):
    """Extract backbone features for every image of ``index`` into ``out_dir``; return the store.

    Images that cannot be read are skipped, counted and listed in the manifest (``strict=True``
    raises instead). Rerunning with the same arguments resumes: finished, intact shards are kept.
    """
    out_dir = Path(out_dir)
    ctx = parse_ctx(ctx)  # cheap argument checks first, before any file is read
    preset = transforms.get_preset(preset)
    zoo.check_backbone(backbone)
    index = load_index(index)
    if len(index) == 0:
        raise BadIndex(getattr(index, "source", out_dir), "the index has no images")
    index, split_note = _ensure_splits(index)
    net, weights_info = zoo.build_backbone(backbone, cut=cut, weights=weights, ctx=ctx,
                                           allow_random=allow_random)
    out_dir.mkdir(parents=True, exist_ok=True)
    if weights_info["file"] is None:
        # Random weights exist only in this process: keep them so predict/export reproduce them.
        params = out_dir / "backbone.params"
        with atomic_path(params) as tmp:
            net.save_parameters(tmp)
        weights_info.update(file=params.name, sha1=file_digest(params, "sha1"))
    items = _items(index)
    config = _config(items, backbone, cut, weights_info, preset, shard_size, list(index.classes))
    shards, skipped = _resume_state(out_dir, config, overwrite)
    manifest = dict(config, splits_assigned=split_note, shards=shards, skipped=skipped,
                    feature_shape=None, dtype="float32", complete=False, ctx=str(ctx),
                    mxnet_version=mx.__version__)
    if shards:
        manifest["feature_shape"] = FeatureStore(out_dir).manifest.get("feature_shape")
    net.hybridize(static_alloc=True, static_shape=True)

    done = {s["start"] for s in shards}
    n_done = sum(s["stop"] - s["start"] for s in shards)
    bar = tqdm(total=len(items), initial=n_done, unit="img", desc="extract", disable=not progress)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(items), shard_size):
            if start in done:
                continue
            stop = min(start + shard_size, len(items))
            shard, new_skips = _extract_shard(net, items, start, stop, preset, ctx, batch_size,
                                              strict, pool, out_dir, bar)
            skipped = [s for s in skipped if not start <= s["row"] < stop] + new_skips
            if shard is not None:
                manifest["feature_shape"] = shard.pop("feature_shape")
                shards.append(shard)
            manifest.update(shards=sorted(shards, key=lambda s: s["start"]), skipped=skipped)
            write_json(out_dir / MANIFEST, manifest)
    bar.close()
    if not shards:
        raise BadIndex(out_dir, f"none of the {len(items)} images could be read (see {MANIFEST})")
    manifest.update(complete=True, finished=datetime.datetime.now().isoformat(timespec="seconds"),
                    n_features=sum(len(s["rows"]) for s in shards), n_skipped=len(skipped))
    write_json(out_dir / MANIFEST, manifest)
    if skipped:
        log.warning("skipped %d unreadable image(s); they are listed in %s", len(skipped),
                    out_dir / MANIFEST)
    return FeatureStore(out_dir)


def _extract_shard(net, items, start, stop, preset, ctx, batch_size, strict, pool, out_dir, bar):
    """Compute one shard; images are decoded in worker threads while the network runs."""
    rows, outputs, skipped = [], [], []
    batches = [list(range(b, min(b + batch_size, stop))) for b in range(start, stop, batch_size)]
    load = lambda rows_: pool.map(lambda r: _load_one(items[r]["path"], preset), rows_)  # noqa: E731
    pending = load(batches[0])
    for k, batch_rows in enumerate(batches):
        loaded = list(pending)
        if k + 1 < len(batches):
            pending = load(batches[k + 1])  # decode the next batch while this one is computed
        good = []
        for r, (img, err) in zip(batch_rows, loaded):
            if err is None:
                good.append((r, img))
            elif strict:
                raise err
            else:
                skipped.append({"row": r, "id": items[r]["id"], "problem": str(err)})
        if good:
            x = mx.nd.array(np.stack([img for _, img in good]), ctx=ctx)
            outputs.append(net(x).asnumpy())
            rows.extend(r for r, _ in good)
        bar.update(len(batch_rows))
    if not rows:
        return None, skipped
    feats = np.concatenate(outputs)
    name = f"shard-{start:07d}.nd"
    path = out_dir / name
    with atomic_path(path) as tmp:
        mx.nd.save(tmp, {"features": mx.nd.array(feats)})
    return {"file": name, "start": start, "stop": stop, "rows": rows, "bytes": path.stat().st_size,
            "sha256": file_digest(path), "feature_shape": list(feats.shape[1:])}, skipped
