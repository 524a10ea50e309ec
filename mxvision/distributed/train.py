"""Data-parallel head training on MXNet's parameter server (``dist_sync``).

Worker r trains on the rows of its own shards (it reads no other shard file).
Every step, each worker draws ``batch_size / N`` of its rows; the servers sum the gradients of
the N sub-batches, and every worker applies the same SGD update to the sum divided by the global
batch (``update_on_kvstore=False``: the optimizer stays on the workers, its state is saved
without pickle by :mod:`mxvision.train.optim_state`, and no optimizer is pickled to the servers).
BatchNorm normalises each sub-batch on its own, as in any data-parallel run; the running
statistics are averaged over the workers after every epoch. ``simulate=N`` runs exactly this
arithmetic in one process, one CPU context per simulated worker: the reference a distributed run
must match (docs/SCALING.md gives the measured differences).

Extraction, shares and the kvstore: :mod:`mxvision.distributed.kvstore`.
"""
import logging
import time
from pathlib import Path

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from tqdm import tqdm

from mxvision.train import data_parallel, metrics, runs
from mxvision.train import loop as train
from mxvision.runtime import parse_ctx
from mxvision.errors import BadRun, MxvisionError
from mxvision.features.store import FeatureStore
from mxvision.models.head import XvisionHead
from mxvision.features.stream import DEFAULT_MAX_MEMORY, ShardStream
from mxvision.distributed.kvstore import owner, worker_kvstore
from mxvision.utils import read_json, write_json

log = logging.getLogger(__name__)

# kvstore keys of our own; gluon.Trainer uses 0 .. number of parameters - 1.
_KEY_START, _KEY_METRICS, _KEY_VAL, _KEY_BN = 1 << 20, (1 << 20) + 1, (1 << 20) + 2, (1 << 20) + 100


class _Sum:
    """Sums over the workers: through the parameter servers (``kv``), or over the ``n`` simulated
    workers of this process. ``init`` keeps rank 0's values (the servers ignore the others')."""

    def __init__(self, kv=None, n=1):
        self.kv, self.n, self.values = kv, kv.num_workers if kv else n, {}
        self.ranks = [kv.rank] if kv else list(range(n))

    def init(self, keys, values):
        self.kv.init(keys, values) if self.kv else self.values.update(zip(keys, values))

    def pull(self, key, like):
        out = mx.nd.zeros_like(like) if self.kv else self.values[key].copy()
        if self.kv:
            self.kv.pull(key, out=out)
        return out

    def sum(self, key, arrays):  # one array per worker of this process
        if not self.kv:
            return mx.nd.add_n(*[a.as_in_context(mx.cpu(0)) for a in arrays])
        out = arrays[0].copy()  # the dist kvstore also writes the sum into the pushed CPU array
        self.kv.pushpull(key, out, out=out)
        return out


class _Rows:
    """One worker's rows of a split: those in the shards it owns, and their global positions."""

    def __init__(self, store, split, rank, n):
        self.store, self.split = store, split
        size, self.shards, self.positions, pos = store.manifest["shard_size"], [], [], 0
        for s, (shard, keep) in enumerate(zip(store.manifest["shards"], store.split_rows(split))):
            if keep and owner(shard["start"], size, n) == rank:
                self.shards.append(s)
                self.positions.extend(range(pos, pos + len(keep)))
            pos += len(keep)
        self.total = pos  # rows of the split over all workers

    def __len__(self):
        return len(self.positions)

    def chunks(self, verify=True):
        for x, y, _ in self.store.iter_shards(self.split, verify=verify, order=self.shards):
            yield x, y


class WorkerData:
    """What one (real or simulated) worker reads: its train rows in sub-batches, its val rows.

    Worker ``rank`` of ``n`` owns the rows of the feature shards :func:`owner` gives it; every
    epoch it draws ``steps`` sub-batches of ``sub`` rows from them (``stream``: through a
    :class:`ShardStream` over its shards, holding at most ``max_memory`` bytes).
    """

    def __init__(self, store, splits, rank, n, sub, steps, seed, stream, max_memory):
        self.train, self.val = _Rows(store, splits[0], rank, n), _Rows(store, splits[1], rank, n)
        self.rank, self.sub, self.steps, self.seed, self.stream = rank, sub, steps, seed, None
        if stream:
            self.stream = ShardStream(store, splits[0], sub, seed=seed, max_memory=max_memory)
            self.stream.shards, self.stream.n_rows = self.train.shards, len(self.train)
        else:
            self.x, self.y = _concat(self.train.chunks())
            self.val_data = [_concat(self.val.chunks())] if len(self.val) else []

    def batches(self, epoch):
        """``steps`` sub-batches of ``sub`` rows, shuffled by (seed, epoch, rank) only."""
        if self.stream is not None:
            batches = self.stream.epoch(epoch)
            try:
                for _ in range(self.steps):
                    yield next(batches)
            finally:
                batches.close()
            return
        order = np.random.RandomState([self.seed, epoch, self.rank]).permutation(len(self.x))
        for k in range(self.steps):
            rows = np.sort(order[k * self.sub:(k + 1) * self.sub])
            yield self.x[rows], self.y[rows]

    def val_chunks(self):
        return self.val.chunks(verify=False) if self.stream is not None else self.val_data


def _copy_to(state, ctx):
    """An optimizer state (NDArray, None or nested tuples/lists of them) copied to ``ctx``;
    load_trainer_states gives every device's updater the very same arrays."""
    if isinstance(state, (tuple, list)):
        return type(state)(_copy_to(s, ctx) for s in state)
    return None if state is None else state.copyto(ctx)


def _concat(chunks):
    chunks = list(chunks)
    return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])


def _split_labels(store, split):
    keeps = store.split_rows(split)
    return np.array([store.items[shard["rows"][k]]["label_id"]
                     for shard, keep in zip(store.manifest["shards"], keeps) for k in keep], np.int64)


def train_distributed(features, out_dir, kv=None, simulate=None, epochs=20, lr=0.01, batch_size=32,
                      momentum=0.0, wd=0.0, seed=0, ctx=None, resume=True, progress=True,
                      train_split="train", val_split="val", keep_checkpoints=train.KEEP_CHECKPOINTS,
                      stream="auto", max_memory=DEFAULT_MAX_MEMORY):
    """Train the Xvision head data-parallel; every worker calls this with the same arguments.

    ``kv``: the dist_sync kvstore (default: this launched worker's); ``simulate=N`` instead runs N
    workers in this process. ``batch_size`` is the global batch (N sub-batches of batch_size / N).
    Rank 0 writes the run folder (:mod:`mxvision.train.runs`), as ``train_head`` does (so evaluate,
    predict and export use it); a resumed run loads its last epoch on every worker, so
    ``out_dir`` must be readable by all of them (a shared file system). Returns the state dict.
    """
    store = features if isinstance(features, FeatureStore) else FeatureStore(features)
    store.check_complete()
    ctx = parse_ctx(ctx)
    if simulate:
        if ctx.device_type != "cpu":
            raise MxvisionError(f"--ctx {ctx}", "--simulate runs its workers on CPU contexts; use --ctx cpu")
        comm, ctxs = _Sum(n=int(simulate)), [mx.cpu(r) for r in range(int(simulate))]
    else:
        comm, ctxs = _Sum(kv or worker_kvstore()), [ctx]
    n, run_dir, leader = comm.n, Path(out_dir), 0 in comm.ranks
    sub = batch_size // n
    if batch_size % n or sub < 2:
        raise BadRun(run_dir, f"batch size {batch_size} must be a multiple of the {n} workers, at "
                              "least 2 rows each (BatchNorm)")
    counts = [len(_Rows(store, train_split, r, n)) for r in range(n)]
    steps = min(counts) // sub
    if steps == 0:
        raise BadRun(store.path, f"worker(s) with {min(counts)} {train_split!r} rows cannot fill a "
                                 f"sub-batch of {sub}; use fewer workers or a smaller batch")
    val_total = _Rows(store, val_split, 0, n).total
    if not val_total:
        raise BadRun(store.path, f"no features for split {val_split!r}")
    if stream == "auto":  # the same choice on every worker (and in the simulation)
        per_worker = max(c + len(_Rows(store, val_split, r, n)) for r, c in enumerate(counts))
        stream = per_worker * store.row_bytes() > max_memory
    hyper = dict(train.DEFAULTS, epochs=epochs, lr=lr, batch_size=batch_size, momentum=momentum,
                 wd=wd, seed=seed)
    config = {"features": runs.features_provenance(store), "hyper": hyper,
              "splits": {"train": train_split, "val": val_split},
              "distributed": {"workers": n, "kvstore": "simulated" if simulate else comm.kv.type,
                              "sub_batch": sub, "steps_per_epoch": steps, "streaming": bool(stream),
                              "assignment": "feature shard k to worker k mod N",
                              "batchnorm": "statistics per sub-batch; running averages averaged "
                                           "over workers after each epoch",
                              "train_metrics": "running, in train mode, during the epoch"}}
    state = runs.new_state()
    if leader:
        runs.prepare_run_dir(run_dir)
        state = runs.load_or_start(run_dir, config, resume)
        if state["last_epoch"]:
            old = read_json(run_dir / runs.CONFIG).get("distributed", {})
            if old.get("workers") != n:
                raise BadRun(run_dir, f"holds a run of {old.get('workers', 1)} worker(s), not {n}; "
                                      "use a new --out or --no-resume")
        write_json(run_dir / runs.CONFIG, config)
    workers = [WorkerData(store, (train_split, val_split), r, n, sub, steps, seed, stream, max_memory)
               for r in comm.ranks]

    mx.random.seed(seed)
    head = XvisionHead(classes=len(store.classes), hidden=hyper["hidden"])
    head.initialize(mx.init.Xavier(), ctx=ctxs)
    head.hybridize()
    for c in ctxs:
        head(mx.nd.zeros((2,) + store.feature_shape, ctx=c))  # deferred shapes (inference mode)
    # Gradients are summed by mxvision.train.data_parallel, not by gluon.Trainer's kvstore (whose
    # first step races its parameter broadcast against the gradient sum): over the servers, or in
    # the simulation over its CPU contexts by a local kvstore. The optimizer runs on each worker.
    trainer = gluon.Trainer(head.collect_params(), "sgd",
                            {"learning_rate": lr, "momentum": momentum, "wd": wd}, kvstore=None)
    running = [p for name, p in sorted(head.collect_params().items())
               if name.endswith(("running_mean", "running_var"))]
    n_classes = len(store.classes)
    comm.init([_KEY_START, _KEY_METRICS, _KEY_VAL] + [_KEY_BN + i for i in range(len(running))],
              [mx.nd.array([state["last_epoch"]]), mx.nd.zeros(3), mx.nd.zeros((val_total, n_classes))]
              + [mx.nd.zeros(p.shape) for p in running])
    start = int(comm.pull(_KEY_START, mx.nd.zeros(1)).asscalar())  # rank 0's last finished epoch
    if start:
        runs.load_checkpoint(run_dir, start, {"params": head}, trainer, ctxs)
        for updater, c in zip(trainer._updaters[1:], ctxs[1:]):  # simulated workers: own copies
            updater.states = {i: _copy_to(st, c) for i, st in updater.states.items()}
        state = state if leader else dict(runs.new_state(), last_epoch=start)
    grads_kv = comm.kv or mx.kv.create("local")
    trained = data_parallel.broadcast_params(grads_kv, head.collect_params())
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    y_val = _split_labels(store, val_split)

    for epoch in tqdm(range(start + 1, epochs + 1), desc=f"train x{n}", unit="epoch", initial=start,
                      total=epochs, disable=not (progress and leader)):
        tic = time.time()
        sums = _train_epoch(head, trainer, loss_fn, workers, ctxs, epoch, steps, batch_size,
                            grads_kv, trained)
        loss_sum, correct, seen = comm.sum(_KEY_METRICS, [mx.nd.array(s) for s in sums]).asnumpy()
        for i, p in enumerate(running):
            total = comm.sum(_KEY_BN + i, [d.copy() for d in p.list_data()])
            p.set_data(total / n)
        val_probs = comm.sum(_KEY_VAL, [_val_probs(head, w, c, val_total, n_classes)
                                        for w, c in zip(workers, ctxs)]).asnumpy()
        runs.check_finite(run_dir, epoch, lr, loss_sum, val_probs)  # the same sums on every worker
        row = {"epoch": epoch, "train_loss": float(loss_sum / seen),
               "train_accuracy": float(correct / seen),
               "val_loss": metrics.cross_entropy(y_val, val_probs),
               "val_accuracy": float((val_probs.argmax(1) == y_val).mean()),
               "val_auc": metrics.auc_score(y_val, val_probs),
               "seconds": round(time.time() - tic, 3)}
        if leader:
            runs.record_epoch(run_dir, state, row, head, trainer, keep_checkpoints)
        else:
            state["history"].append(row)
            state["last_epoch"] = epoch
    if leader and state["history"]:
        runs.prune_checkpoints(run_dir, state["last_epoch"], keep_checkpoints)
        runs.write_log(run_dir, state["history"])
        train.plot_training_curve(state["history"], run_dir / runs.CURVE, state["best_epoch"])
    if comm.kv:  # leave together: a worker that exits while another's pull is in flight hangs it
        mx.nd.waitall()
        comm.kv._barrier()
    return state


def _train_epoch(head, trainer, loss_fn, workers, ctxs, epoch, steps, batch_size, kv, trained):
    """One epoch of synchronous steps; per worker [loss sum, correct, rows] of its sub-batches."""
    sums = [np.zeros(3, np.float32) for _ in workers]
    batches = [w.batches(epoch) for w in workers]
    try:
        for _ in range(steps):
            data = [next(b) for b in batches]
            xs = [mx.nd.array(x, ctx=c) for (x, _), c in zip(data, ctxs)]
            ys = [mx.nd.array(y, ctx=c) for (_, y), c in zip(data, ctxs)]
            with autograd.record():
                outs = [head(x) for x in xs]
                losses = [loss_fn(o, y) for o, y in zip(outs, ys)]
            autograd.backward(losses)
            data_parallel.allreduce_grads(kv, trained)  # summed over all sub-batches
            trainer.update(batch_size)  # / global batch
            for s, out, loss, (_, y) in zip(sums, outs, losses, data):
                s += [loss.sum().asscalar(), (out.argmax(axis=1).asnumpy().astype(np.int64) == y).sum(), len(y)]
    finally:
        for b in batches:
            b.close()
    return sums


def _val_probs(head, worker, ctx, total, n_classes):
    """A (total, classes) array holding this worker's validation probabilities, zeros elsewhere."""
    out = np.zeros((total, n_classes), np.float32)
    probs = [train.predict_probs(head, x, ctx) for x, _ in worker.val_chunks()]
    if probs:
        out[worker.val.positions] = np.concatenate(probs)
    return mx.nd.array(out)

