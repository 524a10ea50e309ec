"""Feature extraction: a backbone's features of every image of an index, into a feature store.

The store's layout and reader are in :mod:`mxvision.features.store`. Rerunning with the same
arguments resumes: shards already listed in the manifest and intact are kept.

Speed on a CPU (measured in docs/BENCHMARKS.md): images are decoded, cropped and resized in worker
threads (a 512 px PNG costs ~4 ms of CPU; OpenCV releases the GIL; processes on request, see
:mod:`mxvision.features.stream`) a few batches ahead of the network; every batch has the
same shape (the last is padded) so the static graph is never rebuilt; shards are written and
checksummed by a background thread.
"""
import collections
import contextlib
import datetime
import logging
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from mxvision.features import quantize
from mxvision.data import transforms  # noqa: E402
from mxvision.features.store import FORMAT_VERSION, MANIFEST, FeatureStore  # noqa: E402
from mxvision.features.quantize import Pooled, load_extractor  # noqa: F401  (load_extractor: public here too)
from mxvision.features.stream import ImageBatchLoader, choose_loader
from mxvision import runtime
from mxvision.runtime import parse_ctx
from mxvision.data.folder import index_from_folder
from mxvision.data.index import read_index
from mxvision.data.splits import assign_splits
from mxvision.errors import BadIndex, BadRun, MxvisionError
from mxvision.models import zoo
from mxvision.utils import atomic_path, clean_stale_temps, file_digest, write_json

log = logging.getLogger(__name__)

SPLIT_SEED = 0
STORAGE_DTYPES = ("float32", "float16")
#: The unfinished manifest is rewritten after a shard is written, so that a killed run resumes
#: from there; but it lists every image, and rewriting it after each shard made a large extraction
#: quadratic (100,000 images in shards of 256: 390 rewrites of a ~20 MB file). A rewrite is
#: skipped while the time since the last one is under 1/MANIFEST_SHARE of that one's duration: the
#: rewrites take at most about this share of the run, a small store still lists every shard at
#: once, and a crash loses the listing of at most a few seconds' shards (recomputed on resume).
MANIFEST_SHARE = 0.1


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


def _items(index, targets=()):
    items = [
        {"id": i, "path": str(p), "label": lab, "label_id": int(lid), "patient_id": pid, "split": s}
        for i, p, lab, lid, pid, s in zip(index.ids, index.paths, index.labels, index.label_ids,
                                          index.patient_ids, index.splits)
    ]
    if targets:  # only then: a plain index gives the same items as before (resume compares them)
        for item, row in zip(items, targets):
            item["targets"] = row
    return items


def pathology_targets(index):
    """The index's torchxrayvision pathology columns (:data:`mxvision.data.labels.PATHOLOGIES`,
    in the index's column order) and per row their values as JSON: 1, 0 or None (missing;
    ``''`` and CheXpert's ``-1`` read as missing, :func:`mxvision.data.labels.parse_value`).
    A value that is none of these is refused naming the index, the row and the column."""
    from mxvision.data.labels import PATHOLOGIES, parse_value

    names = [c for c in index.columns if c in PATHOLOGIES]
    rows = []
    for k, values in enumerate(zip(*(index.column(c) for c in names)) if names else ()):
        row = []
        for name, text in zip(names, values):
            try:
                value = parse_value(text)
            except ValueError:
                raise BadIndex(getattr(index, "source", "index"),
                               f"row {k + 1}: pathology {name} is {str(text)[:40]!r}, expected 1, 0 "
                               "or empty (unknown)") from None
            row.append(None if value != value else int(value))
        rows.append(row)
    return names, rows


def _config(index_items, backbone, cut, weights_info, preset, shard_size, classes, dtype="float32",
            storage_dtype="float32", pooled=False, pathologies=()):
    return {
        "format_version": FORMAT_VERSION,
        "backbone": backbone,
        "cut": cut,
        "weights": weights_info,
        "preprocessing": preset.to_dict(),
        "shard_size": shard_size,
        "classes": classes,
        "dtype": dtype,
        "storage_dtype": storage_dtype,
        "pooled": bool(pooled),
        "pathologies": list(pathologies),
        "items": index_items,
    }


_SAME_RUN_KEYS = ("backbone", "cut", "preprocessing", "shard_size", "classes", "items", "dtype",
                  "storage_dtype", "pooled", "pathologies")


def _resume_state(out_dir, config, overwrite):
    """Shards already finished by an earlier run with the same configuration, its skipped rows and
    the key of its reduced-precision backbone (None for float32)."""
    manifest_file = out_dir / MANIFEST
    if overwrite or not manifest_file.exists():
        return [], [], None
    try:
        store = FeatureStore(out_dir)  # checks the manifest; fills the defaults of a version-1 one
    except BadRun as err:
        raise BadRun(err.subject, f"{err.problem}; choose a new --out or pass --overwrite") from None
    old = store.manifest
    same = all(old.get(k) == config[k] for k in _SAME_RUN_KEYS) and \
        old.get("weights", {}).get("sha1") == config["weights"]["sha1"]
    if not same:
        raise BadRun(out_dir, "holds features of another index or configuration; "
                              "choose a new --out or pass --overwrite")
    done = [s for s in old.get("shards", []) if store.check_shard(s)]
    return done, old.get("skipped", []), (old.get("precision") or {}).get("key")


#: An index this long gets a progress bar while its files are checked, and hears at once how
#: many are missing (a shorter one is extracted before anyone would wait for that).
LARGE_INDEX = 10_000


def missing_images(paths, progress=False):
    """The paths whose file is absent (for a ``FILE.rec#KEY`` record, its pack), one stat each
    before anything is decoded: 100,000 paths take well under a second on a local disk, where
    letting the decoders find them took minutes of silent "extraction". A progress bar for
    :data:`LARGE_INDEX` paths or more."""
    from mxvision.data.record_reader import split_record_path

    packs = {}
    missing = []
    for path in tqdm(paths, desc="check files", unit="file", disable=not progress or len(paths) < LARGE_INDEX):
        record = split_record_path(path)
        if record is None:
            if not os.path.isfile(path):
                missing.append(path)
        elif not packs.setdefault(record[0], os.path.isfile(record[0])):
            missing.append(path)
    return missing


def check_images_exist(index, progress=False, resuming=False):
    """Stat every image before a backbone is built: refuse, in one line, an index none of whose
    images exists (a wrong folder, or paths not relative to the CSV) unless ``resuming`` (a store
    already holding their features needs no image); for a large index with some missing, say how
    many at once (they are skipped and listed in the manifest like unreadable images, and
    ``--strict`` stops at the first, as at the first unreadable one)."""
    missing = missing_images(index.paths, progress)
    if not missing:
        return
    source, n = getattr(index, "source", "index"), len(index)
    if len(missing) == n and not resuming:
        raise BadIndex(source, f"none of the {n} image files exist (first: {missing[0]}); "
                               "are the paths relative to the index CSV's folder?")
    if n >= LARGE_INDEX:
        log.warning("%d of %d image files are missing (first: %s); they are skipped and listed in %s",
                    len(missing), n, missing[0], MANIFEST)


def default_preset(backbone):
    """The preprocessing a backbone was trained with (its model-registry entry says; else ImageNet's)."""
    return zoo.default_preset(backbone)


def extract_features(index, out_dir, backbone=zoo.DEFAULT_BACKBONE, cut=zoo.DEFAULT_CUT,
                     weights="imagenet", preset=None, ctx=None, batch_size=16,
                     shard_size=256, allow_random=False, strict=False, overwrite=False,
                     progress=True, workers=2, dtype="float32", calibration=None,
                     calibration_size=quantize.DEFAULT_CALIBRATION_SIZE, storage_dtype="float32",
                     pooled=False, loader="auto", share=None, streams=None):
    """Extract backbone features for every image of ``index`` into ``out_dir``; return the store.

    Images that cannot be read are skipped, counted and listed in the manifest (``strict=True``
    raises instead). Rerunning with the same arguments resumes: finished, intact shards are kept.

    ``dtype`` is the compute precision (``float32``; ``bfloat16`` or ``int8`` on a CPU with
    oneDNN, see :mod:`mxvision.features.quantize`); INT8 is calibrated on ``calibration`` (None: a seeded
    sample of ``calibration_size`` of these images; or an index CSV, a folder, or a list of
    paths). ``storage_dtype="float16"`` halves the shards on disk; ``pooled=True`` stores the
    global average of each map (C values instead of C x H x W). ``loader``: where images are
    decoded (``auto`` = ``thread``, or ``process`` for decoders that hold the GIL),
    ``workers`` of them.
    ``share=(rank, n)``: only shards k with k % n == rank, in a folder of its own (mxvision.distributed.kvstore).
    ``streams``: copies of the network run side by side on alternate batches (None: ``MXVISION_STREAMS``,
    which must be set before the process starts; :func:`mxvision.runtime.streams`).
    """
    started = time.time()
    out_dir = Path(out_dir)
    ctx = parse_ctx(ctx)  # cheap argument checks first, before any file is read
    dtype = quantize.check_dtype(dtype)
    streams = runtime.streams(streams)
    quantize.check_cpu(dtype, ctx)
    if storage_dtype not in STORAGE_DTYPES:
        raise MxvisionError(f"--storage-dtype {storage_dtype}", f"expected one of {', '.join(STORAGE_DTYPES)}")
    preset = transforms.get_preset(preset or default_preset(backbone))
    zoo.check_backbone(backbone)
    index = load_index(index)
    if len(index) == 0:
        raise BadIndex(getattr(index, "source", out_dir), "the index has no images")
    check_images_exist(index, progress, resuming=not overwrite and (out_dir / MANIFEST).is_file())
    index, split_note = _ensure_splits(index)
    net, weights_info = zoo.build_backbone(backbone, cut=cut, weights=weights, ctx=ctx,
                                           allow_random=allow_random)
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out_dir)  # left by a killed run; resuming never needs them
    if weights_info["file"] is None:
        # Random weights exist only in this process: keep them so predict/export reproduce them.
        params = out_dir / "backbone.params"
        with atomic_path(params) as tmp:
            net.save_parameters(tmp)
        weights_info.update(file=params.name, sha1=file_digest(params, "sha1"))
    pathologies, targets = pathology_targets(index)
    items = _items(index, targets if pathologies else ())
    config = _config(items, backbone, cut, weights_info, preset, shard_size, list(index.classes),
                     dtype, storage_dtype, pooled, pathologies)
    shards, skipped, old_key = _resume_state(out_dir, config, overwrite)
    if strict and skipped:
        # An earlier run skipped images: extract their shards again, so this strict run fails on
        # the first unreadable one exactly as a first strict run does (or, fixed, includes it).
        redo = [s["row"] for s in skipped]
        shards = [s for s in shards if not any(s["start"] <= row < s["stop"] for row in redo)]
    precision = None
    # another dtype is another configuration, refused above (_resume_state); another conversion of
    # the same dtype is refused by prepare, before it converts
    if dtype != "float32":
        net, precision = quantize.prepare(net, dtype, ctx, preset, config, out_dir, calibration,
                                          items, calibration_size, resume_key=old_key if shards else None)
    if pooled:
        net = Pooled(net)
    manifest = dict(config, splits_assigned=split_note, shards=shards, skipped=skipped,
                    feature_shape=None, precision=precision, complete=False, ctx=str(ctx),
                    mxnet_version=mx.__version__)
    if shards:
        manifest["feature_shape"] = FeatureStore(out_dir).manifest.get("feature_shape")
    net.hybridize(static_alloc=True, static_shape=True)
    nets = stream_copies(net, streams)
    if streams > 1 and (runtime.engine_workers() or 0) < streams:
        log.warning("%d streams, but MXNet's engine has MXNET_CPU_WORKER_NTHREADS=%s CPU workers: the "
                    "copies take turns; set MXVISION_STREAMS=%d before the process starts", streams,
                    os.environ.get("MXNET_CPU_WORKER_NTHREADS", "1"), streams)

    done = {s["start"] for s in shards}
    todo = [(start, min(start + shard_size, len(items))) for start in range(0, len(items), shard_size)
            if start not in done and (not share or start // shard_size % share[1] == share[0])]
    n_done = sum(s["stop"] - s["start"] for s in shards)
    bar = tqdm(total=len(items), initial=n_done, unit="img", desc="extract", disable=not progress)
    # Every batch has batch_size rows (the last of a shard is padded): one static graph.
    jobs = [((start, stop, b), [items[r]["path"] for r in range(b, min(b + batch_size, stop))],
             batch_size) for start, stop in todo for b in range(start, stop, batch_size)]
    kind = choose_loader(loader, workers)
    writer = ThreadPoolExecutor(max_workers=1)
    pending = None  # the shard being written in the background

    next_listing = 0.0  # time.monotonic() from which the unfinished manifest may be rewritten

    def finish(write):
        nonlocal skipped, next_listing
        shard, new_skips, (start, stop) = write.result()
        skipped = [s for s in skipped if not start <= s["row"] < stop] + new_skips
        if shard is not None:
            manifest["feature_shape"] = shard.pop("feature_shape")
            shards.append(shard)
        manifest.update(shards=sorted(shards, key=lambda s: s["start"]), skipped=skipped)
        tic = time.monotonic()
        if tic >= next_listing:
            write_json(out_dir / MANIFEST, manifest)
            next_listing = tic + (time.monotonic() - tic) / MANIFEST_SHARE

    def settle(done_batch):
        """Wait for a queued batch's features; hand a complete shard to the writer."""
        nonlocal pending
        shard, batch_rows, feats = done_batch
        if feats is not None:
            feats.wait_to_read()  # back-pressure: a batch per stream queued behind this one
        bar.update(len(batch_rows))
        if batch_rows[-1] == shard["stop"] - 1:  # shard complete: write it while the next is computed
            if pending is not None:
                finish(pending)
            parts = shard["parts"]
            feats = (mx.nd.concat(*parts, dim=0) if len(parts) > 1 else parts[0]) if parts else None
            pending = writer.submit(_write_shard, out_dir, shard["start"], shard["stop"],
                                    shard["rows"], feats, shard["skips"])

    pool = ImageBatchLoader(preset, workers, kind)  # process workers start up meanwhile
    # (shard, rows, features) of the batches queued, oldest first: one more than the streams, so
    # that each copy of the network has a batch queued behind the one it computes
    in_flight = collections.deque()
    try:
        if jobs:  # build the static graphs (and oneDNN primitives) before timing the loop
            zeros = mx.nd.zeros((batch_size, preset.channels, preset.size, preset.size), ctx=ctx)
            for warm in [copy(zeros) for copy in nets]:  # side by side, as they will run
                warm.wait_to_read()
        loop_start, loop_cpu = time.time(), _cpu_seconds()
        pool.feed(jobs)
        current = None  # the shard being computed: start, stop, rows, parts (features), skips
        # The network runs asynchronously (MXNet's engine): batch k+1 is fetched from the
        # decoders and queued while batch k computes, and only then is k waited for, so the cores
        # never wait on this loop (with N streams, k+N is queued before k is waited for). Each
        # batch's features are copied out of the static graph's output by an engine operation
        # (ordered before the next forward reuses that memory), straight into the storage dtype,
        # and a shard is their concatenation: no read-back into NumPy, no second copy.
        for j in range(len(jobs)):
            ((start, stop, b), _, _), batch, errors = pool.next()
            if current is None or current["start"] != start:
                current = {"start": start, "stop": stop, "rows": [], "parts": [], "skips": []}
            batch_rows = list(range(b, min(b + batch_size, stop)))
            bad = set()
            for k, err in errors:
                if strict:
                    raise err
                bad.add(k)
                current["skips"].append({"row": batch_rows[k], "id": items[batch_rows[k]]["id"],
                                         "problem": str(err)})
            good = [k for k in range(len(batch_rows)) if k not in bad]
            feats = None
            if good:
                feats = _batch_features(nets[j % streams](mx.nd.array(batch, ctx=ctx)), good, storage_dtype)
                current["parts"].append(feats)
                current["rows"].extend(batch_rows[k] for k in good)
            in_flight.append((current, batch_rows, feats))
            if len(in_flight) > streams:
                settle(in_flight.popleft())
            if batch_rows[-1] == stop - 1:
                current = None
        while in_flight:
            settle(in_flight.popleft())
        if pending is not None:
            finish(pending)
            pending = None
    except BaseException:
        # A --strict failure or Ctrl-C: keep what is computed. The batch in flight may complete a
        # shard; written and listed (in a manifest still marked unfinished), a rerun keeps it.
        with contextlib.suppress(Exception):
            while in_flight:
                settle(in_flight.popleft())
            if pending is not None:
                finish(pending)
                pending = None
        with contextlib.suppress(Exception):
            manifest.update(shards=sorted(shards, key=lambda s: s["start"]), skipped=skipped)
            write_json(out_dir / MANIFEST, manifest)  # everything written so far, still unfinished
        raise
    finally:
        pool.close()
        writer.shutdown(wait=True)
        bar.close()
    if not shards and not share:
        raise BadIndex(out_dir, f"none of the {len(items)} images could be read (see {MANIFEST})")
    n_run = sum(len(j[1]) for j in jobs)
    loop, loop_cpu = time.time() - loop_start, _cpu_seconds() - loop_cpu  # workers reaped by now
    manifest.update(complete=True, finished=datetime.datetime.now().isoformat(timespec="seconds"),
                    n_features=sum(len(s["rows"]) for s in shards), n_skipped=len(skipped),
                    timing={"images": n_run, "loader": kind, "workers": workers, "streams": streams,
                            "batch_size": batch_size, "setup_seconds": round(loop_start - started, 3),
                            "loop_seconds": round(loop, 3),
                            "images_per_s": round(n_run / loop, 2) if n_run and loop > 0 else None,
                            "cpu_ms_per_image": round(1000 * loop_cpu / n_run, 2) if n_run else None})
    write_json(out_dir / MANIFEST, manifest)
    if skipped:
        log.warning("skipped %d unreadable image(s); they are listed in %s", len(skipped),
                    out_dir / MANIFEST)
    return FeatureStore(out_dir)


def stream_copies(net, n):
    """``[net]`` and ``n - 1`` copies of the hybridized ``net`` that share its parameters (not
    copied: the same arrays), each with its own static memory, so MXNet's engine can run one per CPU
    worker at the same time (``mxvision.runtime.streams``)."""
    copies = [net]
    data = mx.sym.var("data")
    for _ in range(n - 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Cannot decide type for ... data": it is float32
            copy = mx.gluon.SymbolBlock(net(data), data, params=net.collect_params())
        copy.hybridize(static_alloc=True, static_shape=True)
        copies.append(copy)
    return copies


def _cpu_seconds():
    """CPU time of this process's threads and of its finished worker processes."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _batch_features(out, good, storage_dtype):
    """Rows ``good`` of a batch's network output as a new CPU array in ``storage_dtype``."""
    fresh = False
    if len(good) < out.shape[0]:  # the padded last batch of a shard, or unreadable images
        out, fresh = out.take(mx.nd.array(good, ctx=out.context, dtype="int64")), True
    if out.dtype != np.dtype(storage_dtype):
        out, fresh = out.astype(storage_dtype), True
    return out.as_in_context(mx.cpu()) if fresh else out.copyto(mx.cpu())


def _write_shard(out_dir, start, stop, rows, feats, skipped):
    """Save one computed shard (temp file + rename) and describe it for the manifest."""
    if not rows:
        return None, skipped, (start, stop)
    name = f"shard-{start:07d}.nd"
    path = out_dir / name
    with atomic_path(path) as tmp:
        mx.nd.save(tmp, {"features": feats})
    return {"file": name, "start": start, "stop": stop, "rows": rows, "bytes": path.stat().st_size,
            "sha256": file_digest(path), "feature_shape": list(feats.shape[1:])}, skipped, (start, stop)
