"""Fine-tuning the last backbone stages and the head end to end, from images.

Starts from a trained run (head trained on frozen features, the usual first step) and trains the
last ``stages`` residual stages of the backbone together with the head. The frozen part runs in
inference mode (its BatchNorm statistics stay as they are); only the trainable part and the head
are recorded for autograd. The result is a new run directory that ``predict``, ``export`` and
``evaluate`` use like any other: its config points at its own ``backbone.params``.

Per epoch it checkpoints the head, the backbone and the trainer state, and resumes from the last
finished epoch with the same result, as ``train_head`` does (the run folder:
:mod:`mxvision.train.runs`; the backbone goes to ``checkpoints/epoch-NNNN.backbone`` and, for the
best epoch, ``backbone.params``).

A multi-label run (:mod:`mxvision.train.multilabel`) is fine-tuned with its own loss, the masked
binary cross-entropy, on the same labels; its epochs are scored by the mean per-label AUC.
"""
import copy
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from tqdm import tqdm

from mxvision.train import data_parallel, metrics, multilabel, runs
from mxvision.data import transforms
from mxvision.train.loop import epoch_batches, plot_training_curve
from mxvision.runtime import parse_ctx
from mxvision.errors import BadRun
from mxvision.features.store import FeatureStore
from mxvision.train.loop import load_classifier
from mxvision.utils import file_digest, write_json

# Checkpoint files of each epoch besides the trainer state, and the best epoch's copies of them.
BEST_COPIES = {"params": runs.BEST, "backbone": runs.BACKBONE}


def split_items(config, split):
    """The index items (path, label...) of ``split`` in the feature store a run was trained on:
    the images fine-tuning reads."""
    store = FeatureStore(config["features"]["features_dir"])
    items = [it for it in store.items if it["split"] == split]
    if not items:
        raise BadRun(store.path, f"no images in split {split!r} to fine-tune on")
    return items


def _load_images(pool, items, preset):
    return np.stack(list(pool.map(lambda it: transforms.load_image(it["path"], preset), items)))


def image_probs(net, items, preset, ctx, batch_size=16, pool=None):
    """Class probabilities of a full classifier (backbone + head + softmax) for index items."""
    own = pool is None
    pool = pool or ThreadPoolExecutor(max_workers=2)
    try:
        out = [net(mx.nd.array(_load_images(pool, items[i:i + batch_size], preset), ctx=ctx)).asnumpy()
               for i in range(0, len(items), batch_size)]
    finally:
        if own:
            pool.shutdown()
    return np.concatenate(out)


def _settings_changed(old_config, config):
    """The fine-tuning settings (all but ``epochs``, which may grow) that differ from a resumed run's."""
    old, new = old_config.get("finetune", {}), config["finetune"]
    return [k for k in sorted(set(old) | set(new)) if k != "epochs" and old.get(k) != new.get(k)]


def finetune_run(run_dir, out_dir, stages=1, epochs=5, lr=0.001, batch_size=8, momentum=0.9,
                 seed=0, ctx=None, resume=True, progress=True, keep_checkpoints=2, kvstore=None):
    """Fine-tune the last ``stages`` backbone stages + head of ``run_dir`` into ``out_dir``.

    ``kvstore``: a dist_sync kvstore; each worker then trains on its slice of every global batch
    (gradients summed on the servers) and rank 0 evaluates and writes the run (mxvision.distributed.kvstore).
    """
    ctx = parse_ctx(ctx)
    rank, n = (kvstore.rank, kvstore.num_workers) if kvstore else (0, 1)
    out_dir = Path(out_dir)
    if Path(run_dir).resolve() == out_dir.resolve():
        raise BadRun(out_dir, "fine-tuning writes a new run; choose an --out other than --run")
    net, base_config = load_classifier(run_dir, ctx=ctx, softmax=False)
    backbone, head = net.backbone, net.head
    preset = transforms.get_preset(base_config["features"]["preprocessing"]["name"])
    frozen, trainable, finish = backbone.split_stages(stages)
    hyper = {"stages": stages, "epochs": epochs, "lr": lr, "batch_size": batch_size,
             "momentum": momentum, "seed": seed}
    config = copy.deepcopy(base_config)
    config["finetune"] = dict(hyper, from_run=str(Path(run_dir).resolve()))
    out_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:  # the only writer of the run folder
        runs.prepare_run_dir(out_dir)
    state = runs.load_or_start(out_dir, config, resume, changed=_settings_changed, kind="fine-tuning run")
    train_items, val_items = split_items(config, "train"), split_items(config, "val")
    y_train = np.array([it["label_id"] for it in train_items])
    y_val = np.array([it["label_id"] for it in val_items])
    labels = config["labels"] if multilabel.is_multilabel(config) else None
    if labels:  # a multi-label run: the same masked loss and metrics as its head's training
        order = FeatureStore(config["features"]["features_dir"]).pathologies
        y_train = multilabel.target_matrix(train_items, labels, order)
        y_val = multilabel.target_matrix(val_items, labels, order)

    params = gluon.ParameterDict()
    for block in trainable:
        params.update(block.collect_params())
    params.update(head.collect_params())
    # Workers sum gradients through data_parallel (gluon.Trainer's own kvstore use races its
    # parameter broadcast against the first gradient sum); the optimizer is local to each.
    trainer = gluon.Trainer(params, "sgd", {"learning_rate": lr, "momentum": momentum}, kvstore=None)
    if state["last_epoch"]:
        runs.load_checkpoint(out_dir, state["last_epoch"], {"params": head, "backbone": backbone},
                             trainer, ctx)
    trained = data_parallel.broadcast_params(kvstore, params) if kvstore else None

    def run_frozen(x):
        for block in frozen:
            x = block(x)
        return x

    def run_trainable(x):
        for block in trainable:
            x = block(x)
        return head(finish(x))

    loss_fn = multilabel.masked_bce_loss if labels else gluon.loss.SoftmaxCrossEntropyLoss()
    output = mx.nd.sigmoid if labels else mx.nd.softmax
    softmax_net = lambda x: output(run_trainable(run_frozen(x)))  # noqa: E731
    pool = ThreadPoolExecutor(max_workers=2)
    try:
        for epoch in tqdm(range(state["last_epoch"] + 1, epochs + 1), desc="finetune", unit="epoch",
                          initial=state["last_epoch"], total=epochs, disable=not progress):
            tic = time.time()
            for batch in epoch_batches(len(train_items), batch_size, seed, epoch):
                if len(batch) < 2 * n:  # each worker needs 2 rows (BatchNorm); all skip alike
                    continue
                mine = batch[rank::n]  # this worker's slice of the global batch
                x = mx.nd.array(_load_images(pool, [train_items[i] for i in mine], preset), ctx=ctx)
                y = mx.nd.array(y_train[mine], ctx=ctx)
                z = run_frozen(x)  # outside autograd: frozen stages stay in inference mode
                with autograd.record():
                    loss = loss_fn(run_trainable(z), y)
                loss.backward()
                if kvstore:
                    data_parallel.allreduce_grads(kvstore, trained)  # summed over the workers' slices
                trainer.update(len(batch))  # / global batch
            if rank:  # rank 0 evaluates and writes the epoch; the others wait for it (below)
                mx.nd.waitall()
                kvstore._barrier()
                continue
            train_probs = image_probs(softmax_net, train_items, preset, ctx, pool=pool)
            val_probs = image_probs(softmax_net, val_items, preset, ctx, pool=pool)
            runs.check_finite(out_dir, epoch, lr, train_probs, val_probs)
            if labels:
                row = multilabel.epoch_row(epoch, y_train, train_probs, y_val, val_probs,
                                           round(time.time() - tic, 3))
            else:
                row = {"epoch": epoch,
                       "train_loss": metrics.cross_entropy(y_train, train_probs),
                       "train_accuracy": float((train_probs.argmax(1) == y_train).mean()),
                       "val_loss": metrics.cross_entropy(y_val, val_probs),
                       "val_accuracy": float((val_probs.argmax(1) == y_val).mean()),
                       "val_auc": metrics.auc_score(y_val, val_probs),
                       "seconds": round(time.time() - tic, 3)}
            runs.save_checkpoint(out_dir, epoch, {"params": head, "backbone": backbone}, trainer)
            runs.update_best(out_dir, state, row, BEST_COPIES)
            config["features"]["weights"] = dict(
                base_config["features"]["weights"], file=str((out_dir / runs.BACKBONE).resolve()),
                sha1=file_digest(out_dir / runs.BACKBONE, "sha1"),
                description=f"{base_config['features']['backbone']} fine-tuned ({stages} stage(s)) "
                            f"from {base_config['features']['weights']['description']}")
            write_json(out_dir / runs.CONFIG, config)  # points at the best epoch's backbone
            runs.finish_epoch(out_dir, state, row, keep_checkpoints)
            if kvstore:  # a worker leaving while rank 0's last pull is in flight hangs rank 0
                kvstore._barrier()
    finally:
        pool.shutdown()
    plot_training_curve(state["history"], out_dir / runs.CURVE, state["best_epoch"])
    return state
