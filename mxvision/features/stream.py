"""Bounded-memory streams: image batches for extraction, shuffled feature batches for training.

**Images to batches** (:class:`ImageBatchLoader`): decoding, cropping and resizing a 512 px PNG
costs ~4 ms of CPU, a fifth of the INT8 network's time per image, so it runs a few batches ahead of
the network in worker threads or processes. Threads are the default: OpenCV releases the GIL while
it decodes and resizes, a batch needs no pickling through a pipe, and no worker has to start
(a spawned process re-imports the main module, often MXNet: ~2 s of CPU each). Measured with INT8
(docs/BENCHMARKS.md): 1,536 PNGs, threads 57.2 and 51.6 vs processes 46.9 and 48.8 images/s; 384
uncompressed 12-bit DICOMs, 73.7 vs 48.1. Processes remain an option for decoders that hold the
GIL. This module imports no MXNet, so spawned workers start as fast as the main module allows.

**Features to batches** (:class:`ShardStream`): training on a feature store larger than memory.

A store of 50,000 radiographs at 2048x7x7 is ~20 GB in float32; training must not load it. A
:class:`ShardStream` keeps at most a *window* of shards in memory (plus the next window, read by
a background thread while the head trains on the current one) and shuffles at two levels, both
determined by the seed and the epoch only:

1. the order of the shards is a random permutation per epoch;
2. the rows of each window of ``window_shards`` consecutive shards (in that order) are permuted,
   and batches are cut from them; the few rows that do not fill a last batch are carried into the
   next window, so every batch but the epoch's last has ``batch_size`` rows.

A trailing batch of one row is dropped, as in the in-memory trainer (BatchNorm needs two). Peak
memory is about three windows of float32 rows (the one being trained on, its concatenation while
it is built, and the one being read), whatever the size of the store.
"""
import multiprocessing
import os
import threading
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from queue import Queue

import numpy as np

from mxvision.data import transforms
from mxvision.errors import BadImage, MxvisionError

DEFAULT_MAX_MEMORY = 1 << 30  # bytes of float32 feature rows held at once (two windows)


def _load_one(path, preset):
    try:
        if ".rec#" in str(path):  # a packed record; imported lazily, it brings MXNet into the worker
            from mxvision.data import record_reader
            return record_reader.load_image(path, preset), None
        return transforms.load_image(path, preset), None
    except BadImage as err:
        return None, err


def _load_batch(paths, preset, pad_to):
    """Decode + preprocess ``paths`` into a (pad_to, C, S, S) float32 array (unused rows zero).

    Runs in a worker process or thread; returns the array and ``[(position, BadImage)]``.
    """
    preset = transforms.get_preset(preset)
    batch = np.zeros((max(pad_to, len(paths)), preset.channels, preset.size, preset.size), np.float32)
    errors = []
    for k, path in enumerate(paths):
        img, err = _load_one(path, preset)
        if err is None:
            batch[k] = img
        else:
            errors.append((k, err))
    return batch, errors


# Decode workers run at a lower priority so they fill the gaps of the network's OpenMP threads
# rather than preempting them mid-operator (an OpenMP barrier waits for its slowest thread).
WORKER_NICE = int(os.environ.get("MXVISION_DECODE_NICE", "10"))


def _worker_init(nice=WORKER_NICE):
    import cv2
    cv2.setNumThreads(1)  # one image per worker at a time; the network has the cores
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass


class ImageBatchLoader:
    """Decodes batches ``depth`` ahead of the network, in worker processes or threads."""

    def __init__(self, preset, workers, kind, depth=None):
        self.preset = preset.to_dict()
        self.kind = kind
        if kind == "process":
            # spawn, not fork: a worker forked from a process whose MXNet/OpenMP threads are
            # running can deadlock (seen here: a full test run hung in two forked workers at 0%
            # CPU). Spawned workers import only OpenCV and NumPy (no MXNet), so they start fast;
            # scripts need the usual `if __name__ == "__main__":` guard.
            ctx = multiprocessing.get_context("spawn")
            self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                            initializer=_worker_init)
            # The first submit starts every worker; start them now, so their start-up overlaps
            # with the caller's own (building the network) instead of delaying the first batch.
            self.pool.submit(os.getpid)
        else:
            self.pool = ThreadPoolExecutor(max_workers=workers)
        self.depth = depth or workers + 2
        self.queue = deque()

    def feed(self, jobs):
        self.jobs = iter(jobs)
        self._fill()

    def _fill(self):
        while len(self.queue) < self.depth:
            job = next(self.jobs, None)
            if job is None:
                return
            paths, pad_to = job[1], job[2]
            self.queue.append((job, self.pool.submit(_load_batch, paths, self.preset, pad_to)))

    def next(self):
        job, future = self.queue.popleft()
        batch, errors = future.result()
        self._fill()
        return job, batch, errors

    def close(self):
        for _, future in self.queue:  # queued batches not yet started are dropped (what
            future.cancel()           # shutdown(cancel_futures=True) does from Python 3.9 on)
        self.queue.clear()
        self.pool.shutdown(wait=True)


def choose_loader(loader, workers):
    """``thread`` or ``process`` (``auto`` is threads: measured faster for PNG and DICOM files)."""
    if loader not in ("auto", "process", "thread"):
        raise MxvisionError(f"loader {loader!r}", "expected auto, process or thread")
    if workers < 1:
        raise MxvisionError(f"workers {workers}", "need at least one decode worker")
    return "thread" if loader == "auto" else loader


def epoch_rng(seed, epoch):
    """The random stream of one epoch, the same formula the in-memory trainer uses."""
    return np.random.RandomState(seed * 100003 + epoch)


def window_size(store, split, max_memory=DEFAULT_MAX_MEMORY):
    """How many shards fit in one window when two windows must fit in ``max_memory`` bytes."""
    rows = max((len(k) for k in store.split_rows(split)), default=1) or 1
    return max(1, int(max_memory // (2 * rows * store.row_bytes())))


class ShardStream:
    """Batches ``(x float32, y int64)`` of one split of a :class:`~mxvision.features.store.FeatureStore`.

    ``window_shards`` (default: from ``max_memory``) bounds the shards held; ``verify`` checks
    every shard's sha256 as it is read (on the bytes already in memory, so it costs no extra I/O).
    """

    def __init__(self, store, split, batch_size, seed=0, window_shards=None,
                 max_memory=DEFAULT_MAX_MEMORY, verify=True, drop_singleton=True):
        self.store, self.split, self.batch_size, self.seed = store, split, int(batch_size), seed
        self.verify, self.drop_singleton = verify, drop_singleton
        self.window_shards = int(window_shards or window_size(store, split, max_memory))
        keeps = store.split_rows(split)
        self.shards = [s for s, k in enumerate(keeps) if k]  # shards holding rows of the split
        self.n_rows = sum(len(k) for k in keeps)

    def __len__(self):
        return self.n_rows

    def windows(self, epoch):
        """The shard windows of ``epoch``, in order (lists of shard numbers)."""
        rng = epoch_rng(self.seed, epoch)
        order = [self.shards[k] for k in rng.permutation(len(self.shards))]
        return [order[i:i + self.window_shards] for i in range(0, len(order), self.window_shards)], rng

    def _read(self, shards):
        feats, labels = [], []
        for x, y, _ in self.store.iter_shards(self.split, verify=self.verify, order=shards):
            feats.append(x)
            labels.append(y)
        return feats, labels

    def _prefetched(self, windows):
        """Yield each window's ``(features, labels)`` lists, reading the next one in a thread."""
        queue = Queue(maxsize=1)
        stop = threading.Event()

        def reader():
            try:
                for w in windows:
                    if stop.is_set():
                        return
                    queue.put(("ok", self._read(w)))
                queue.put(("end", None))
            except BaseException as err:  # handed to the consumer, raised there
                queue.put(("error", err))

        thread = threading.Thread(target=reader, name="mxvision-shard-reader", daemon=True)
        thread.start()
        try:
            while True:
                kind, value = queue.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise value
                yield value
        finally:
            stop.set()
            while thread.is_alive():  # unblock a reader waiting on a full queue
                while not queue.empty():
                    queue.get_nowait()
                thread.join(timeout=0.1)

    def epoch(self, epoch):
        """Yield the shuffled batches of ``epoch`` (1-based, as in the trainer)."""
        windows, rng = self.windows(epoch)
        carry_x = carry_y = None
        for feats, labels in self._prefetched(windows):
            if carry_x is not None:
                feats.insert(0, carry_x)
                labels.insert(0, carry_y)
            x = np.concatenate(feats) if len(feats) > 1 else feats[0]
            y = np.concatenate(labels) if len(labels) > 1 else labels[0]
            del feats, labels
            order = rng.permutation(len(x))
            full = len(x) - len(x) % self.batch_size
            for i in range(0, full, self.batch_size):
                idx = np.sort(order[i:i + self.batch_size])  # sorted gather reads memory in order
                yield x[idx], y[idx]
            rest = order[full:]
            carry_x, carry_y = (x[rest], y[rest]) if len(rest) else (None, None)
            del x, y
        if carry_x is not None and (len(carry_x) > 1 or not self.drop_singleton):
            yield carry_x, carry_y
