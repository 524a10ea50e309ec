"""Data-parallel extraction and head training on MXNet's own parameter server (``dist_sync``).

No cluster system of our own: a job is a scheduler, parameter servers and N workers started by
MXNet's launcher (``mxnet/tools/launch.py``, over ssh) or by :mod:`mxvision.distributed.cluster` on one machine;
each worker learns its ``rank`` and ``num_workers`` from the ``dist_sync`` kvstore (ps-lite).

**Extraction.** The feature store is cut into shards of ``shard_size`` consecutive index rows;
shard k belongs to worker ``k mod N``. Worker r extracts its shards into a folder of its own,
``OUT/shares/<r>-of-<N>/`` (own manifest, own temp files, resumable like any extraction, so no
worker ever cleans or overwrites another's files); after a barrier rank 0 moves the shard files
into ``OUT`` and writes one ``manifest.json``: the same shard boundaries, files, ids, labels and
checksums a single process writes. A share lost with its worker is re-run alone
(``mxvision cluster extract ... --share r/N``, no cluster needed), then ``mxvision cluster merge``.
Random backbone weights are seeded, so every worker builds the same network; the merge refuses
shares whose weights (sha1), preprocessing or precision differ.

Training: :mod:`mxvision.distributed.train`.
"""
import logging
import math
import os
import shutil
import time
from pathlib import Path

import mxnet as mx

from mxvision.errors import BadRun, MxvisionError
from mxvision.features.extract import MANIFEST, FeatureStore, extract_features, load_index
from mxvision.utils import file_digest, write_json

log = logging.getLogger(__name__)

SHARES = "shares"
KVSTORES = ("dist_sync", "dist_device_sync")
# Manifest keys every share of one store must agree on.
_SAME = ("format_version", "backbone", "cut", "weights", "preprocessing", "shard_size", "classes",
         "items", "dtype", "storage_dtype", "pooled", "precision", "splits_assigned")


# --- ranks, shares and the kvstore ---------------------------------------------------------------

def owner(start, shard_size, num_workers):
    """The worker that extracts, and trains on, the shard starting at index row ``start``."""
    return start // shard_size % num_workers


def parse_share(text):
    """``"r/N"`` → ``(r, N)``: share r (0-based) of N."""
    rank, _, num = str(text).partition("/")
    if not (rank.strip().isdigit() and num.strip().isdigit()) or not 0 <= int(rank) < int(num):
        raise MxvisionError(f"--share {text}", "expected RANK/WORKERS with 0 <= RANK < WORKERS, e.g. 1/2")
    return int(rank), int(num)


def share_dir(out_dir, rank, num_workers):
    return Path(out_dir) / SHARES / f"{rank}-of-{num_workers}"


def in_cluster():
    """True in a worker process started by a launcher (MXNet's or :mod:`mxvision.distributed.cluster`)."""
    return os.environ.get("DMLC_ROLE") == "worker"


def worker_kvstore(kind="dist_sync"):
    """The distributed kvstore of this worker (connects to the scheduler named by DMLC_*)."""
    if kind not in KVSTORES:
        raise MxvisionError(f"--kvstore {kind}", f"expected one of {', '.join(KVSTORES)} "
                            "(dist_async would keep the optimizer on the servers, pickled)")
    if not in_cluster():
        raise MxvisionError(f"kvstore {kind}", "this process was not started as a worker (no "
                            "DMLC_ROLE=worker); run it under `mxvision cluster local` or MXNet's "
                            "launch.py, or use --share R/N (extract) / --simulate N (train)")
    return mx.kv.create(kind)


# --- extraction ----------------------------------------------------------------------------------

def extract_share(index, out_dir, rank, num_workers, shard_size=256, overwrite=False, **kwargs):
    """Extract share ``rank`` of ``num_workers`` into ``OUT/shares/<rank>-of-<N>``; resumable.

    Returns the share's :class:`FeatureStore`, or None when there is nothing to do: the share owns
    no shard (more workers than shards) or ``out_dir`` already holds the merged store.
    """
    index = load_index(index)
    merged = _merged_store(out_dir)
    if merged is not None and not overwrite and not share_dir(out_dir, rank, num_workers).exists():
        if [it["path"] for it in merged.items] != [str(p) for p in index.paths] or \
                merged.manifest["shard_size"] != shard_size:
            raise BadRun(out_dir, "holds a finished feature store of another index or shard size; "
                                  "choose a new --out or pass --overwrite")
        log.info("%s is already merged; share %d/%d has nothing to do", out_dir, rank, num_workers)
        return None
    if rank >= math.ceil(len(index) / shard_size):
        return None
    return extract_features(index, share_dir(out_dir, rank, num_workers), shard_size=shard_size,
                            overwrite=overwrite, share=(rank, num_workers), **kwargs)


def _merged_store(out_dir):
    if not (Path(out_dir) / MANIFEST).is_file():
        return None
    store = FeatureStore(out_dir)
    return store if store.complete else None


def merge_shares(out_dir, num_workers, verify=True):
    """Move the shard files of the N shares into ``out_dir`` and write the one manifest.

    Safe to rerun after a crash (files already moved are checked where they are now). The merged
    manifest is written last, atomically; the share folders go only after it.
    """
    out_dir = Path(out_dir)
    stores = {r: FeatureStore(share_dir(out_dir, r, num_workers)) for r in range(num_workers)
              if (share_dir(out_dir, r, num_workers) / MANIFEST).is_file()}
    merged = None if stores else _merged_store(out_dir)
    if merged is not None:
        return merged
    ref = stores[min(stores)].manifest if stores else {"items": [None] * num_workers, "shard_size": 1}
    n_items, size = len(ref["items"]), ref["shard_size"]
    expected = range(min(num_workers, math.ceil(n_items / size)))
    missing = [r for r in expected if r not in stores or not stores[r].complete]
    if missing:
        raise BadRun(out_dir, f"share(s) {', '.join(f'{r}/{num_workers}' for r in missing)} missing or "
                              f"unfinished (in {SHARES}/); rerun each with `mxvision cluster extract "
                              "... --share R/N`, then `mxvision cluster merge`")
    shards, skipped, feature_shape = [], [], None
    for r, store in sorted(stores.items()):
        m = store.manifest
        for key in _SAME:
            if m.get(key) != ref.get(key):
                raise BadRun(store.path, f"was extracted with another {key} than share "
                                         f"{min(stores)}/{num_workers}; rerun it with the same options")
        if any(owner(s["start"], size, num_workers) != r for s in m["shards"]):
            raise BadRun(store.path, f"holds shards of another share than {r}/{num_workers}")
        shards += m["shards"]
        skipped += m["skipped"]
        feature_shape = feature_shape or m["feature_shape"]
    covered = sorted([row for s in shards for row in s["rows"]] + [s["row"] for s in skipped])
    if covered != list(range(n_items)):
        raise BadRun(out_dir, "the shares do not cover every image exactly once; rerun them")
    if feature_shape is None:
        raise BadRun(out_dir, f"none of the {n_items} images could be read (see the shares' manifests)")
    for r, store in sorted(stores.items()):
        for shard in store.manifest["shards"]:
            src, dst = store.shard_path(shard), out_dir / shard["file"]
            if src.exists():
                os.replace(src, dst)
            if not (dst.is_file() and dst.stat().st_size == shard["bytes"]) or \
                    (verify and file_digest(dst) != shard["sha256"]):
                raise BadRun(dst, "missing or corrupt feature shard; rerun its share")
    first = stores[min(stores)].path
    for extra in sorted(first.iterdir()):  # backbone.params (random weights), int8/bf16 backbone
        if extra.is_file() and extra.name != MANIFEST and not extra.name.startswith((".", "shard-")):
            os.replace(extra, out_dir / extra.name)
    if ref["weights"].get("file") == "backbone.params" and \
            file_digest(out_dir / "backbone.params", "sha1") != ref["weights"]["sha1"]:
        raise BadRun(out_dir / "backbone.params", "does not match the weights the shares used")
    manifest = dict(ref, shards=sorted(shards, key=lambda s: s["start"]),
                    skipped=sorted(skipped, key=lambda s: s["row"]), feature_shape=feature_shape,
                    complete=True, finished=max(s.manifest.get("finished", "") for s in stores.values()),
                    n_features=sum(len(s["rows"]) for s in shards), n_skipped=len(skipped),
                    timing={"shares": {f"{r}/{num_workers}": s.manifest.get("timing")
                                       for r, s in sorted(stores.items())}},
                    distributed={"workers": num_workers,
                                 "assignment": "shard k (rows k*shard_size ...) by worker k mod N"})
    write_json(out_dir / MANIFEST, manifest)
    for r in stores:
        shutil.rmtree(share_dir(out_dir, r, num_workers))
    try:
        (out_dir / SHARES).rmdir()
    except OSError:  # shares of another N are left alone
        pass
    return FeatureStore(out_dir)


def extract_distributed(index, out_dir, kv=None, **kwargs):
    """One worker's part of a distributed extraction: its share, a barrier, rank 0 merges."""
    kv = kv or worker_kvstore()
    rank, n = kv.rank, kv.num_workers
    tic = time.time()
    extract_share(index, out_dir, rank, n, **kwargs)
    log.info("worker %d/%d: share extracted in %.1f s; waiting for the others", rank, n, time.time() - tic)
    kv._barrier()
    if rank == 0:
        merge_shares(out_dir, n)
    kv._barrier()  # nobody returns before the merged manifest exists
    return FeatureStore(out_dir)
