"""The lesion-insertion check's from-scratch mode: train NoduleNet on nodules inserted on the fly.

Why: with no pretrained weights to be had, frozen random features do not see inserted nodules
(AUC about 0.5, ``docs/EVALUATION.md`` (c)); a small detector trained on simulated nodules with a
*dense* target does. Training uses only the train-split normal films of an index: every step draws
``batch_pairs`` films, each shown twice in the batch, unchanged and with a fresh random nodule
(:func:`mxvision.audit.lesion.insert_random_nodule`, the insertion and ranges of ``mxvision synth``),
both flipped alike, so the anatomy cancels. The evidence map (:mod:`mxvision.models.nodule_net`)
is supervised per cell with the nodule's disc (a positive-weighted logistic loss; with the image
label alone it learnt nothing, loss stayed 0.693; adding a pairwise logistic loss on the pair's two
maxima, the score the evaluation ranks, made it learn slower: val AUC 0.85 against 0.90 at step 1000).

A run folder (:mod:`mxvision.train.runs`, counted in steps) holds ``config.json`` (settings,
data), ``state.json`` (last finished step, the log of checkpoint evaluations, best step, the
threshold), ``log.csv``, ``checkpoints/step-NNNNNN.params|.states`` (optimizer state without
pickle) and ``best.params``. Every ``checkpoint_every`` steps the network is scored on validation
pairs made in memory from the val-split normals exactly as ``mxvision synth --seed SEED --variants
VAL_VARIANTS`` would write them (:func:`mxvision.audit.lesion.nodule_versions`); the best mean of
validation AUC and paired AUC gives ``best.params`` and, at the end, the decision threshold
(Youden's J on val). The draws of step *k* depend only on (seed, *k*) and the learning rate is a
function of *k*, so a run killed at any moment resumes from its last checkpoint to the same
weights as an uninterrupted run.
"""
import time
from pathlib import Path

import cv2
import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from sklearn import metrics as skm
from tqdm import tqdm

from mxvision.audit import lesion
from mxvision.runtime import parse_ctx
from mxvision.data.splits import assign_splits
from mxvision.errors import BadIndex, BadRun
from mxvision.io.images import read_image
from mxvision.models import zoo
from mxvision.models.nodule_net import STRIDE, image_scores
from mxvision.train import runs
from mxvision.train.metrics import auc_score
from mxvision.train.runs import BEST, CONFIG, STATE
from mxvision.utils import atomic_path, read_json, write_json

DEFAULTS = {"steps": 1500, "size": 256, "width": 16, "extra": 2, "dilation": 2, "batch_pairs": 8,
            "lr": 2e-3, "warmup": 0.03, "augment": 1.0, "pos_weight": 50.0, "backgrounds": "normal",
            "radius": list(lesion.RADIUS_512), "contrast": list(lesion.CONTRAST), "val_variants": 10,
            "checkpoint_every": 250, "tta": True, "seed": 0}
LOG_COLUMNS = ("step", "loss", "train_auc", "val_auc", "val_paired_auc", "seconds")


def _square(img):
    """The centred square of a film (uint8 or [0, 1] float) as contiguous uint8."""
    img = img if img.dtype == np.uint8 else lesion.to_uint8(img)
    side = min(img.shape)
    top, left = (img.shape[0] - side) // 2, (img.shape[1] - side) // 2
    return np.ascontiguousarray(img[top:top + side, left:left + side])


def _small(img, size):
    """:func:`_square` resized to ``size`` (area interpolation when shrinking, as 512 -> 256)."""
    img = _square(img)
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if size < img.shape[0] else cv2.INTER_LINEAR)


def prepare(img, size):
    """A film as the network's input: :func:`_small`, grey levels mapped to about +-2."""
    return (_small(img, size).astype(np.float32) / 255.0 - 0.5) / 0.25


def disc_target(nodule, side, out):
    """The (out, out) evidence-map target: cells whose centre lies in the nodule's disc (at least
    the centre cell) of a ``side`` px film."""
    scale = out / side
    cx, cy, r = nodule["x"] * scale, nodule["y"] * scale, max(nodule["radius"] * scale, 0.75)
    yy, xx = np.mgrid[:out, :out] + 0.5
    return ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r).astype(np.float32)


def lr_at(step, hyper):
    """Linear warm-up over the first ``warmup`` fraction of the steps, then cosine decay to 0."""
    steps, warm = hyper["steps"], max(1, int(hyper["warmup"] * hyper["steps"]))
    if step <= warm:
        return hyper["lr"] * step / warm
    return hyper["lr"] * 0.5 * (1 + np.cos(np.pi * (step - warm) / max(1, steps - warm)))


def training_films(index, split, backgrounds="normal"):
    """``(id, film, lung mask, lung depth, regions to ignore)`` of the ``split`` films: normal
    films, and with ``backgrounds="all"`` also the films with a real nodule, whose nodule disc
    (doubled, + 10 px at 512) is left out of the loss and of the placement of inserted nodules."""
    from mxvision.audit.localization import index_lesions

    known = {les[0]: les for les in index_lesions(index, split)} if backgrounds == "all" else {}
    rows = [k for k, (lab, s) in enumerate(zip(index.labels, index.splits))
            if s == split and (lab == "normal" or k in known)]
    if not any(index.labels[k] == "normal" for k in rows):
        raise BadIndex(index.source, f"no normal films in split {split!r} (the detector trains on the "
                                     "train-split normals and selects on the val-split normals)")
    films = []
    for k in rows:
        img = _square(read_image(index.paths[k]))
        mask, ignore = lesion.lung_mask(img), []
        if k in known:
            _, x, y, r, grid = known[k]
            f = 1.0 if grid is None else min(img.shape) / grid
            ignore = [{"x": x * f, "y": y * f, "radius": 2 * r * f + 10 * min(img.shape) / lesion.REFERENCE_SIZE}]
            yy, xx = np.ogrid[:img.shape[0], :img.shape[1]]
            mask = mask & ((xx - ignore[0]["x"]) ** 2 + (yy - ignore[0]["y"]) ** 2 > ignore[0]["radius"] ** 2)
        films.append((index.ids[k], img, mask, lesion.lung_depth(mask), ignore))
    return films


def make_batch(films, rng, hyper):
    """One training batch: ``(x, target, ignore)`` float32 arrays (2B, 1, size, size) and twice
    (2B, 1, out, out); rows 2i and 2i+1 are film i without and with its nodule, mirrored alike
    (half the time) and, with ``augment`` = a > 0, warped alike (rotation +-10a degrees, scale
    x e^(+-0.1a), shift +-4a %) and given the same gamma (e^(+-0.25a)): more anatomy than the few
    training films. ``ignore`` marks the cells of a real nodule (``backgrounds="all"``)."""
    size, out, a = hyper["size"], hyper["size"] // STRIDE, hyper["augment"]
    xs, ts, igs = [], [], []
    for k in rng.integers(len(films), size=hyper["batch_pairs"]):
        _, img, mask, depth, ignore = films[k]
        with_nodule, nodule = lesion.insert_random_nodule(img, mask, rng, hyper["radius"], hyper["contrast"], depth)
        pair = [_small(img, size), _small(with_nodule, size)]
        s = size / img.shape[0]
        discs = np.array([[d["x"] * s, d["y"] * s, d["radius"] * s] for d in [nodule] + ignore])
        if rng.random() < 0.5:
            pair, discs[:, 0] = [p[:, ::-1] for p in pair], size - discs[:, 0]
        if a:
            m = cv2.getRotationMatrix2D((size / 2, size / 2), rng.uniform(-10, 10) * a,
                                        np.exp(rng.uniform(-0.1, 0.1) * a))
            m[:, 2] += rng.uniform(-0.04, 0.04, 2) * a * size
            lut = np.round(255 * (np.arange(256) / 255) ** np.exp(rng.uniform(-0.25, 0.25) * a)).astype(np.uint8)
            pair = [cv2.LUT(cv2.warpAffine(np.ascontiguousarray(p), m, (size, size), flags=cv2.INTER_LINEAR,
                                           borderMode=cv2.BORDER_REFLECT), lut) for p in pair]
            discs[:, :2] = discs[:, :2] @ m[:, :2].T + m[:, 2]
            discs[:, 2] *= np.sqrt(abs(np.linalg.det(m[:, :2])))
        maps = [disc_target({"x": x, "y": y, "radius": r}, size, out) for x, y, r in discs]
        ig = np.max(maps[1:], axis=0) if ignore else np.zeros_like(maps[0])
        xs += [(p.astype(np.float32) / 255.0 - 0.5) / 0.25 for p in pair]
        ts += [np.zeros_like(maps[0]), maps[0]]
        igs += [ig, ig]
    return np.stack(xs)[:, None], np.stack(ts)[:, None], np.stack(igs)[:, None]


def pair_set(films, variants, hyper):
    """Prepared images, labels (1 = nodule) and source film of each, for checkpoint scoring: each
    film unchanged plus ``variants`` nodule versions as ``mxvision synth`` makes them."""
    xs, labels, groups = [], [], []
    for image_id, img, mask, _, _ in films:
        versions = lesion.nodule_versions(img, image_id, variants, hyper["seed"], mask,
                                          tuple(hyper["radius"]), tuple(hyper["contrast"]))
        for image, nodule in [(img, None)] + versions:
            xs.append(prepare(image, hyper["size"]))
            labels.append(int(nodule is not None))
            groups.append(image_id)
    return np.stack(xs), np.array(labels), groups


def score_arrays(net, xs, ctx, tta=True, batch=16, maps=False):
    """Scores (max evidence; with ``tta`` the mean of the image's and its mirror's) of prepared
    images ``xs`` (N, H, W); with ``maps`` also the un-mirrored evidence maps (N, h, w)."""
    scores, out_maps = [], []
    for i in range(0, len(xs), batch):
        x = mx.nd.array(np.asarray(xs[i:i + batch])[:, None], ctx=ctx)
        ev = net(x)
        s = image_scores(ev)
        if tta:
            s = (s + image_scores(net(x.flip(axis=3)))) / 2
        scores.append(s.asnumpy())
        if maps:
            out_maps.append(ev[:, 0].asnumpy())
    s = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    return (s, np.concatenate(out_maps)) if maps else s


def _settings_changed(old_config, config):
    """Every setting and the index must match for a run to resume."""
    changed = [k for k in config["hyper"] if old_config.get("hyper", {}).get(k) != config["hyper"][k]]
    return changed + (["index"] if old_config.get("index") != config["index"] else [])


def train_detector(index, out_dir, ctx=None, resume=True, progress=True, keep_checkpoints=2, stop_at=None,
                   **settings):
    """Train a NoduleNet on nodules inserted into the train-split normals of ``index`` (an Index
    or CSV) into ``out_dir``; settings as :data:`DEFAULTS`. ``stop_at``: checkpoint and return
    after that step (rerunning resumes). Returns the state dict (``history``, ``best_step``,
    ``threshold``)."""
    from mxvision.features.extract import load_index

    unknown = set(settings) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown detector setting(s): {', '.join(sorted(unknown))}")
    hyper = dict(DEFAULTS, **settings)
    hyper["radius"], hyper["contrast"] = [float(v) for v in hyper["radius"]], [float(v) for v in hyper["contrast"]]
    if hyper["backgrounds"] not in ("normal", "all"):
        raise BadRun("detector", f"backgrounds must be normal or all, not {hyper['backgrounds']!r}")
    if hyper["size"] % STRIDE or hyper["size"] < 4 * STRIDE or hyper["steps"] < 1 or hyper["batch_pairs"] < 1:
        raise BadRun("detector", f"size must be a multiple of {STRIDE} (at least {4 * STRIDE}); "
                                 "steps and batch pairs at least 1")
    ctx, out_dir = parse_ctx(ctx), Path(out_dir)
    index = load_index(index)
    assigned = not all(index.splits)
    if assigned:
        index = assign_splits(index, seed=hyper["seed"])
    train_films, val_films = training_films(index, "train", hyper["backgrounds"]), training_films(index, "val")
    config = {"kind": "nodule_detector", "model": "nodule_net",
              "net": {k: hyper[k] for k in ("width", "extra", "dilation")}, "hyper": hyper,
              "index": str(Path(index.source).resolve()) if index.source else None,
              "splits_assigned": assigned, "train_films": [f[0] for f in train_films],
              "val_films": [f[0] for f in val_films]}
    runs.prepare_run_dir(out_dir)
    state = runs.load_or_start(out_dir, config, resume, changed=_settings_changed, kind="detector run",
                               fresh={"last_step": 0, "history": [], "best_step": None, "threshold": None})
    if not state["last_step"]:  # a fresh start: another run's checkpoints would confuse pruning
        runs.remove_checkpoints(out_dir, "step")
    write_json(out_dir / CONFIG, config)
    net = zoo.get_model("nodule_net", ctx=ctx, seed=hyper["seed"], **config["net"])
    trainer = gluon.Trainer(net.collect_params(), "adam", {"learning_rate": hyper["lr"]})
    if state["last_step"]:
        runs.load_checkpoint(out_dir, state["last_step"], {"params": net}, trainer, ctx, unit="step")
    val = pair_set(val_films, hyper["val_variants"], hyper)
    train_check = pair_set([f for f in train_films if not f[4]], 1, hyper)  # over-fitting check
    loss_fn = gluon.loss.SigmoidBinaryCrossEntropyLoss()
    end = min(hyper["steps"], stop_at or hyper["steps"])
    bar = tqdm(total=hyper["steps"], initial=state["last_step"], desc="detector", unit="step",
               disable=not progress)
    tic, losses = time.time(), []
    for step in range(state["last_step"] + 1, end + 1):
        x, t, ignore = (mx.nd.array(a, ctx=ctx) for a in
                        make_batch(train_films, np.random.default_rng([hyper["seed"], step]), hyper))
        trainer.set_learning_rate(lr_at(step, hyper))
        with autograd.record():
            loss = loss_fn(net(x), t, (1.0 + hyper["pos_weight"] * t) * (1 - ignore)).mean()
        loss.backward()
        trainer.step(1)
        losses.append(float(loss.asscalar()))
        bar.update(1)
        if step % hyper["checkpoint_every"] == 0 or step == end:
            row = _checkpoint_step(net, trainer, out_dir, step, state, val, train_check, ctx, hyper)
            row.update(loss=float(np.mean(losses)), seconds=round(time.time() - tic, 1))
            tic, losses = time.time(), []
            state["history"].append(row)
            write_json(out_dir / STATE, state)  # the step is finished only from here on
            runs.prune_checkpoints(out_dir, step, keep_checkpoints, unit="step")
            runs.write_log(out_dir, state["history"], LOG_COLUMNS, float_format=".4f", with_json=False)
            bar.set_postfix(loss=f"{row['loss']:.3f}", val_auc=f"{row['val_auc']:.3f}")
    bar.close()
    if state["last_step"] >= hyper["steps"] and state["threshold"] is None:
        best = zoo.get_model("nodule_net", ctx=ctx, weights_file=out_dir / BEST, **config["net"])
        s = score_arrays(best, val[0], ctx, hyper["tta"])
        fpr, tpr, thr = skm.roc_curve(val[1], s)
        finite = np.isfinite(thr)  # sklearn's first threshold is +inf (nothing called a nodule)
        state["threshold"] = float(thr[finite][int(np.argmax((tpr - fpr)[finite]))])
        state["val_best"] = {"auc": auc_score(val[1], s),
                             "paired_auc": lesion.paired_auc_arrays(val[1], val[2], s)}
        write_json(out_dir / STATE, state)
    return state


def _checkpoint_step(net, trainer, out_dir, step, state, val, train_check, ctx, hyper):
    """Score val (and the training-film check), save params + optimizer state, update best."""
    s = score_arrays(net, val[0], ctx, hyper["tta"])
    row = {"step": step, "val_auc": auc_score(val[1], s),
           "val_paired_auc": lesion.paired_auc_arrays(val[1], val[2], s),
           "train_auc": auc_score(train_check[1], score_arrays(net, train_check[0], ctx, hyper["tta"]))}
    runs.save_checkpoint(out_dir, step, {"params": net}, trainer, unit="step")
    best = runs.best_row(state, unit="step")
    # The image AUC over a few val films hinges on the one or two clean films with the most
    # nodule-like spot; the paired AUC is steadier. Their mean selects; ties go to the later step.
    key = lambda r: np.nan_to_num(r["val_auc"] + r["val_paired_auc"], nan=-1)  # noqa: E731
    if best is None or key(row) >= key(best):
        state["best_step"] = step
        with atomic_path(out_dir / BEST) as tmp:
            net.save_parameters(tmp)
    state["last_step"] = step
    return row


def load_detector(run_dir, ctx=None, params="best"):
    """``(net, config, state)`` of a detector run; ``params`` "best", "last" or a .params path."""
    run_dir = Path(run_dir)
    try:
        config, state = read_json(run_dir / CONFIG), read_json(run_dir / STATE)
    except (OSError, ValueError):
        raise BadRun(run_dir, "not a detector run (no readable config.json and state.json); "
                              "train one with `mxvision detector train`") from None
    if config.get("kind") != "nodule_detector":
        raise BadRun(run_dir / CONFIG, "not a detector run (kind is not nodule_detector)")
    last = runs.checkpoint_path(run_dir, state["last_step"], "params", unit="step")
    path = {"best": run_dir / BEST, "last": last}.get(params, params)
    if not Path(path).is_file():
        raise BadRun(path, "no such parameters file (training not started or files removed)")
    try:
        net = zoo.get_model(config["model"], ctx=parse_ctx(ctx), weights_file=path, **config["net"])
    except (mx.base.MXNetError, AssertionError) as err:
        raise BadRun(path, f"parameters do not fit the network ({str(err).splitlines()[0][:120]})") from None
    return net, config, state


def score_images(net, images, size, ctx, tta=True):
    """``(scores, peaks)`` of films (uint8 or [0, 1] arrays): the image score and the (x, y) of
    the evidence maximum in the film's pixels (the map upsampled bilinearly to the centred square)."""
    scores, maps = score_arrays(net, [prepare(img, size) for img in images], ctx, tta, maps=True)
    peaks = []
    for img, ev in zip(images, maps):
        side = min(img.shape)
        up = cv2.resize(ev, (side, side), interpolation=cv2.INTER_LINEAR)
        y, x = np.unravel_index(int(np.argmax(up)), up.shape)
        peaks.append((int(x) + (img.shape[1] - side) // 2, int(y) + (img.shape[0] - side) // 2))
    return scores, peaks
