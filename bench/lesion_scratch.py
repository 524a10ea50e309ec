"""Lesion-insertion check, from-scratch mode: a thin script over :mod:`mxvision.audit.detector`.

Trains (or resumes) a detector on the train-split normal films of ``--index``, evaluates it on the
val and test splits of a lesion-insertion set (``mxvision synth``), and with ``--real`` scores the
real JSRT nodules too (AUC against normals, pointing game of the evidence maximum). The same as

    mxvision detector train --index jsrt.csv --out det
    mxvision detector evaluate --run det --pairs lesion10/index.csv --split test

plus the real-nodule figures and timing. Example (the figures of docs/EVALUATION.md (c)):

    mxvision synth --index jsrt.csv --out lesion10 --variants 10 --splits val test
    nice -n 10 python bench/lesion_scratch.py --index jsrt.csv --pairs lesion10/index.csv --out det \\
        --real jsrt.csv -- --steps 1500
"""
import argparse
import json
import time

import numpy as np

from mxvision.audit import localization
from mxvision.runtime import parse_ctx
from mxvision.data.index import read_index
from mxvision.io.images import read_image
from mxvision.audit.detector import DEFAULTS, load_detector, score_images, train_detector
from mxvision.audit.detector_evaluation import evaluate_detector
from mxvision.train.metrics import auc_score


def _settings(extra):
    """``--steps 1500 --size 384 ...`` after ``--`` -> detector settings (types from DEFAULTS)."""
    out, k = {}, 0
    while k < len(extra):
        key = extra[k].lstrip("-").replace("-", "_")
        if isinstance(DEFAULTS[key], list):
            out[key], k = [float(v) for v in extra[k + 1:k + 3]], k + 3
        else:
            out[key], k = type(DEFAULTS[key])(extra[k + 1]), k + 2
    return out


def _summary(m):
    ci = m.get("ci95", {})
    bins = lambda key: ", ".join(f"{b['range'][0]:g}-{b['range'][1]:g}: {b['auc']:.3f}" for b in m[key])  # noqa
    return (f"{m['split'].upper()}: AUC {m['auc']:.3f} (95% CI {ci['auc'][0]:.3f}-{ci['auc'][1]:.3f}, by film), "
            f"paired {m['paired_auc']:.3f} ({ci['paired_auc'][0]:.3f}-{ci['paired_auc'][1]:.3f}) on "
            f"{m['n_images']} images from {m['n_films']} films not trained on"
            + (" (they chose the checkpoint and threshold)" if m["split"] == "val" else "") + "\n"
            f"  at the val threshold: sensitivity {m.get('sensitivity', float('nan')):.3f}, specificity "
            f"{m.get('specificity', float('nan')):.3f}, confusion {m.get('confusion_matrix')}\n"
            f"  AUC by contrast {bins('by_contrast')}; by radius@512 {bins('by_radius_512')}\n"
            f"  pointing game {m['pointing']['hits']}/{m['pointing']['n']}")


def real_nodules(run, real_csv):
    """AUC of the real JSRT nodule films against the val/test normals, and the pointing game on all
    real nodules: the detector never saw a real nodule. Returns a dict of figures."""
    ctx = parse_ctx("auto")
    net, config, _ = load_detector(run, ctx)
    real = read_index(real_csv)
    rows = [k for k, (lab, s) in enumerate(zip(real.labels, real.splits)) if lab == "nodule" or s != "train"]
    images = [read_image(real.paths[k]) for k in rows]
    scores, peaks = score_images(net, images, config["hyper"]["size"], ctx, config["hyper"]["tta"])
    labels = np.array([real.labels[k] == "nodule" for k in rows], int)
    test = np.array([real.splits[k] == "test" for k in rows])
    out = {"auc_all_nodules_vs_val_test_normals": auc_score(labels, scores),
           "auc_test_split": auc_score(labels[test], scores[test])}
    where = {les[0]: les for les in localization.index_lesions(real)}
    hits = [np.hypot(p[0] - where[k][1] * min(img.shape) / where[k][4], p[1] - where[k][2] * min(img.shape) /
                     where[k][4]) <= where[k][3] * min(img.shape) / where[k][4]
            for k, p, img in zip(rows, peaks, images) if k in where]
    out["pointing_all_real_nodules"] = {"hits": int(sum(hits)), "n": len(hits)}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", required=True, help="index with the source films (train-split normals used)")
    ap.add_argument("--pairs", required=True, help="lesion-insertion index (val and test splits scored)")
    ap.add_argument("--out", required=True, help="detector run folder (resumed when it exists)")
    ap.add_argument("--real", default=None, help="an index with real nodules (JSRT's) to score too")
    ap.add_argument("--eval-only", action="store_true", help="skip training (evaluate the run as it is)")
    ap.add_argument("settings", nargs=argparse.REMAINDER, help="-- then detector settings, e.g. --steps 1500")
    args = ap.parse_args()
    settings = _settings([s for s in args.settings if s != "--"])
    tic = time.time()
    if not args.eval_only:
        state = train_detector(args.index, args.out, **settings)
        print(f"trained {state['last_step']} steps in {time.time() - tic:.0f} s (this call); best step "
              f"{state['best_step']}, val threshold {state['threshold']}", flush=True)
    for split in ("val", "test"):
        m = evaluate_detector(args.out, args.pairs, split=split, out_dir=f"{args.out}/eval-{split}")
        print(_summary(m), flush=True)
    if args.real:
        print("REAL JSRT nodules (trained on simulated nodules only):", json.dumps(real_nodules(args.out, args.real)))


if __name__ == "__main__":
    main()
