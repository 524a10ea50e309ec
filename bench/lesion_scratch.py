"""Lesion-insertion check, from-scratch mode: a small CNN trained on nodules inserted on the fly.

Trains only on the *train-split* normal films of an index (fresh random nodules every step, each
film shown with and without its nodule in the same batch, so the anatomy cancels), then scores the
files of a lesion-insertion set (``mxvision synth``) of films it never saw. The network ends in a
1-channel evidence map and a global max, so its score is "the strongest nodule-like spot".

    python bench/lesion_scratch.py --index jsrt.csv --pairs lesion/index.csv --steps 900 --real jsrt.csv

Training is dense: the evidence map (stride 8) is supervised with the inserted nodule's disc (a
positive-weighted per-cell logistic loss), a much stronger signal than the image label alone
(measured: with only the image label and a soft-max pooling, 300 steps learnt nothing, loss 0.693).
Prints the validation AUC during training; at the end the test AUC, the paired AUC and a pointing
game on the test pairs, and with ``--real`` the AUC and pointing game on real JSRT nodules.
"""
import argparse
import time

import cv2
import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from mxnet.gluon import nn

from mxvision import explain, lesion
from mxvision.data.index import read_index
from mxvision.io.images import read_image
from mxvision.metrics import auc_score

SIZE = 256


def prep(img_u8):
    small = cv2.resize(img_u8, (SIZE, SIZE), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    return (small - 0.5) / 0.25


def build(width=16):
    net = nn.HybridSequential()
    for channels, stride in ((width, 2), (2 * width, 2), (2 * width, 1), (4 * width, 2), (4 * width, 1)):
        net.add(nn.Conv2D(channels, 3, strides=stride, padding=1, use_bias=False), nn.BatchNorm(),
                nn.LeakyReLU(0.1))
    net.add(nn.Conv2D(1, 1))
    return net


def score(net, images, ctx, batch=16):
    out = []
    for i in range(0, len(images), batch):
        x = mx.nd.array(np.stack(images[i:i + batch])[:, None], ctx=ctx)
        out.append(net(x).max(axis=(1, 2, 3)).asnumpy())
    return np.concatenate(out)


def evaluate(net, index, split, ctx):
    splits = (split,) if isinstance(split, str) else split
    rows = [k for k, s in enumerate(index.splits) if s in splits]
    imgs = [prep(lesion.to_uint8(read_image(index.paths[k]))) for k in rows]
    s = score(net, imgs, ctx)
    y = np.array([index.labels[k] == "nodule" for k in rows], int)
    auc = auc_score(y, np.stack([-s, s], 1))
    paired, n = lesion.paired_auc(index, {index.ids[k]: v for k, v in zip(rows, s)})
    return auc, paired, n, len(rows), len({index.patient_ids[k] for k in rows})


OUT = SIZE // 8  # evidence map size
POS_WEIGHT = 50.0


def nodule_target(nodule, shape):
    """Cells of the evidence map within the nodule's disc (at least the centre cell)."""
    scale = OUT / min(shape)
    cx, cy, r = nodule["x"] * scale, nodule["y"] * scale, max(nodule["radius"] * scale, 0.75)
    yy, xx = np.mgrid[:OUT, :OUT] + 0.5
    return ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r).astype(np.float32)


def strata(net, index, splits, ctx):
    """Paired AUC by nodule radius and contrast (thirds of their ranges): which nodules it misses."""
    rows = [k for k, s in enumerate(index.splits) if s in splits]
    sc = dict(zip((index.ids[k] for k in rows),
                  score(net, [prep(lesion.to_uint8(read_image(index.paths[k]))) for k in rows], ctx)))
    clean = {index.patient_ids[k]: sc[index.ids[k]] for k in rows if index.labels[k] == "normal"}
    recs = [(float(index.column("nodule_radius")[k]), float(index.column("nodule_contrast")[k]),
             np.sign(sc[index.ids[k]] - clean[index.patient_ids[k]]) / 2 + 0.5)  # ties: the max is
            for k in rows if index.labels[k] == "nodule"]                        # elsewhere, count half
    for name, col, edges in (("radius px@512", 0, (7, 11.33, 15.67, 20)), ("contrast", 1, (15, 23.33, 31.67, 40))):
        cells = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            won = [r[2] for r in recs if lo <= r[col] <= hi]
            cells.append(f"{lo:.0f}-{hi:.0f}: {np.mean(won):.2f} (n={len(won)})" if won else f"{lo:.0f}-{hi:.0f}: -")
        print(f"  paired AUC by {name}: " + ", ".join(cells))


def pointing(net, index, split, ctx):
    """Pointing game of the evidence map against the known nodules of ``index``."""
    lesions = explain.index_lesions(index, split)
    images = [lesion.to_uint8(read_image(index.paths[les[0]])) for les in lesions]
    maps, centres, radii = [], [], []
    for les, img in zip(lesions, images):
        ev = net(mx.nd.array(prep(img)[None, None], ctx=ctx))[0, 0].asnumpy()
        ev = (ev - ev.min()) / max(ev.max() - ev.min(), 1e-12)
        maps.append(explain.to_image_grid(ev, img.shape))
        scale = 1.0 if les[4] is None else min(img.shape) / les[4]
        centres.append((les[1] * scale, les[2] * scale))
        radii.append(les[3] * scale)
    masks = [lesion.lung_mask(i) for i in images]
    masks = [m if m.any() else lesion.nominal_lung_mask(m.shape) for m in masks]
    return explain.pointing_game(maps, centres, radii, masks)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", required=True, help="index with the source films (train-split normals used)")
    ap.add_argument("--pairs", required=True, help="lesion-insertion index (val/test splits scored)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-pairs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", default=None, help="write the trained parameters here")
    ap.add_argument("--real", default=None, help="an index with real nodules (JSRT) to score too")
    ap.add_argument("--load", default=None, help="skip training: evaluate these saved parameters")
    args = ap.parse_args()
    ctx = mx.cpu()
    mx.random.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    src = read_index(args.index)
    films = [lesion.to_uint8(read_image(p)) for p, lab, s in zip(src.paths, src.labels, src.splits)
             if lab == "normal" and s == "train"]
    masks = [lesion.lung_mask(f) for f in films]
    pairs = read_index(args.pairs)
    net = build()
    net.initialize(mx.init.Xavier(magnitude=2), ctx=ctx)
    net.hybridize()
    if args.load:
        net.load_parameters(args.load, ctx=ctx)
        args.steps = 0
    trainer = gluon.Trainer(net.collect_params(), "adam", {"learning_rate": args.lr})
    loss_fn = gluon.loss.SigmoidBinaryCrossEntropyLoss()
    tic = time.time()
    for step in range(1, args.steps + 1):
        xs, targets = [], []
        for k in rng.integers(len(films), size=args.batch_pairs):
            with_nodule, nod = lesion.insert_random_nodule(films[k], masks[k], rng)
            flip = rng.random() < 0.5
            target = nodule_target(nod, films[k].shape)
            for img, t in ((films[k], np.zeros_like(target)), (with_nodule, target)):
                x = prep(img)
                xs.append(x[:, ::-1] if flip else x)
                targets.append(t[:, ::-1] if flip else t)
        x = mx.nd.array(np.stack(xs)[:, None], ctx=ctx)
        t = mx.nd.array(np.stack(targets)[:, None], ctx=ctx)
        weight = 1.0 + POS_WEIGHT * t
        trainer.set_learning_rate(args.lr * 0.5 * (1 + np.cos(np.pi * (step - 1) / args.steps)))
        with autograd.record():
            loss = loss_fn(net(x), t, weight)
        loss.backward()
        trainer.step(len(xs))
        if step % 200 == 0 or step == args.steps:
            auc, paired, n, m, _ = evaluate(net, pairs, "val", ctx)
            print(f"step {step}: loss {loss.mean().asscalar():.3f}  val AUC {auc:.3f} (n={m}), "
                  f"paired {paired:.3f} ({n} pairs)  {time.time() - tic:.0f} s", flush=True)
    if args.steps == 0 and not args.load:
        return
    auc, paired, n, m, films_seen = evaluate(net, pairs, "test", ctx)
    point = pointing(net, pairs, "test", ctx)
    print(f"TEST: AUC {auc:.3f} on {m} images from {films_seen} films never seen "
          f"(paired AUC {paired:.3f}, {n} pairs); " + (f"parameters from {args.load}" if args.load else
          f"trained on {len(films)} train-split normal films, {args.steps} steps x "
          f"{2 * args.batch_pairs} images, {time.time() - tic:.0f} s"))
    both = evaluate(net, pairs, ("val", "test"), ctx)
    print(f"VAL+TEST (no model selection on val): AUC {both[0]:.3f} on {both[3]} images from {both[4]} "
          f"unseen films (paired AUC {both[1]:.3f}, {both[2]} pairs)")
    strata(net, pairs, ("val", "test"), ctx)
    print(f"TEST pointing game (evidence-map maximum within the simulated nodule's radius): "
          f"{point['hits']}/{point['n']} = {point['hit_rate']:.3f}, chance {point['chance_rate']:.3f}")
    if args.real:
        real = read_index(args.real)
        for split in ("test", None):
            rows = [k for k, sp in enumerate(real.splits) if (sp == split if split else
                    (real.labels[k] == "nodule" or sp != "train"))]
            imgs = [prep(lesion.to_uint8(read_image(real.paths[k]))) for k in rows]
            sc = score(net, imgs, ctx)
            y = np.array([real.labels[k] == "nodule" for k in rows], int)
            print(f"REAL nodules ({split or 'all nodule films + val/test normals'}): AUC "
                  f"{auc_score(y, np.stack([-sc, sc], 1)):.3f} on {y.sum()} nodule / {len(y) - y.sum()} "
                  f"normal films (trained on simulated nodules only)")
        point = pointing(net, real, None, ctx)
        print(f"REAL pointing game, all {point['n']} JSRT nodules: {point['hits']} hits = "
              f"{point['hit_rate']:.3f}, chance {point['chance_rate']:.3f}")
    if args.save:
        net.save_parameters(args.save)


if __name__ == "__main__":
    main()
