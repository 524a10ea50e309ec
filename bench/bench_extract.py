"""Feature-extraction speed on a CPU, mxvision vs ONNX Runtime, in one process on the same inputs.

    python bench/bench_extract.py                        # everything (~10 min on 2 cores)
    python bench/bench_extract.py --skip-auc --skip-e2e  # model-only throughput only

What it measures (the truncated ResNet-50 v2, cut at stage4_unit2_relu1, 224 px, RANDOM seeded
weights -- no pretrained weights exist on this machine):

1. **Model only**: images/s of mxvision's backbone in float32, bfloat16 (MXNet AMP) and INT8
   (oneDNN, calibrated on 64 real JSRT radiographs), and of ONNX Runtime float32 on the same
   network exported with ``mx.onnx`` -- both as exported, and with the weights made constants
   (ORT's own ``remove_initializer_from_input`` fix, which lets ORT fold and fuse; its best fp32).
   Engines run in interleaved rounds on the same batch, so load from other processes hits every
   engine alike; the median round counts. Ratios are to ONNX Runtime's best fp32.
2. **Feature agreement**: relative L1 error and cosine of bf16/INT8 features vs float32.
3. **End to end**: files (512x512 PNGs: the JSRT images, copied to reach ``--e2e-images``) to
   feature shards on disk with ``extract_features`` (decode in worker threads and in worker
   processes, ``--loaders``), each round paired with a model-only pass over as many images right
   before it (same load conditions), with the CPU time per image of both: their ratio is the
   highest fraction the cores allow; with ``--e2e-pack`` also from a RecordIO pack of the same
   images (``mxvision data pack``).
4. **Downstream AUC** on the JSRT development set (all 154 images, 5-fold stratified
   cross-validation, the Xvision head with train_head's defaults, out-of-fold AUC, mean over
   ``--auc-seeds`` head seeds with its spread) for float32, bfloat16, INT8, float32 stored as
   float16, and pooled float32 features.

Prints a JSON summary (and writes it with ``--json``).
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import mxvision  # noqa: E402,F401  (sets OMP_NUM_THREADS to every core before MXNet loads)
import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402

from mxvision.features import quantize
from mxvision.data import transforms  # noqa: E402
from mxvision.runtime import shared_dir  # noqa: E402
from mxvision.features.extract import extract_features  # noqa: E402
from mxvision.models import zoo  # noqa: E402

warnings.simplefilter("ignore")
PRESET = transforms.get_preset("imagenet224")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- engines
def mxnet_engine(block, ctx):
    block.hybridize(static_alloc=True, static_shape=True)
    return lambda x: block(mx.nd.array(x, ctx=ctx)).asnumpy()


def export_onnx(net, batch, folder):
    from mxnet import onnx as mxonnx
    import onnx
    net.hybridize()
    net(mx.nd.zeros((batch, 3, 224, 224))).wait_to_read()
    net.export(str(folder / "fp32"), 0)
    path = folder / "fp32.onnx"
    mxonnx.export_model(str(folder / "fp32-symbol.json"), str(folder / "fp32-0000.params"),
                        [(batch, 3, 224, 224)], [np.float32], str(path))
    model = onnx.load(str(path))
    inits = {i.name for i in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    fixed = folder / "fp32-const.onnx"
    onnx.save(model, str(fixed))
    return path, fixed


def ort_engine(path, threads):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def interleaved(engines, x, rounds, iters):
    """Median images/s per engine over ``rounds`` interleaved rounds of ``iters`` batches."""
    for f in engines.values():  # warm-up: graph building, oneDNN primitive caches
        f(x)
        f(x)
    rates = {k: [] for k in engines}
    for r in range(rounds):
        for name, f in engines.items():
            tic = time.perf_counter()
            for _ in range(iters):
                f(x)
            rates[name].append(iters * len(x) / (time.perf_counter() - tic))
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()))
    return {k: {"median": round(statistics.median(v), 2), "best": round(max(v), 2),
                "rounds": [round(a, 2) for a in v]} for k, v in rates.items()}


def agreement(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return {"rel_l1": round(float(np.abs(a - b).sum() / np.abs(b).sum()), 5),
            "cosine": round(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)), 6)}


# --------------------------------------------------------------------------- downstream AUC
def cv_auc(x, y, folds=5, seed=0, epochs=20, lr=0.01, batch_size=32, also=None):
    """Out-of-fold AUC of the Xvision head trained as train_head does (same defaults, seeded).

    The folds are fixed (seed 0); ``seed`` sets the head's initialisation and batch order, so
    the spread over seeds shows how much of an AUC difference is training noise. ``also``:
    ``{name: features}`` of the same images in another precision, scored by the *same* heads
    (trained on ``x``): the AUC change the precision causes with the training noise held fixed.
    Returns the AUC, or ``(auc, {name: auc})`` with ``also``."""
    from mxnet import autograd, gluon
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold
    from mxvision.models.head import XvisionHead
    from mxvision.train.loop import epoch_batches, predict_probs

    ctx = mx.cpu()
    oof, oof_also = np.zeros(len(y)), {}
    for k, (tr, te) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=0).split(x, y)):
        mx.random.seed(seed)
        head = XvisionHead(classes=2, hidden=512)
        head.initialize(mx.init.Xavier(), ctx=ctx)
        head.hybridize()
        head(mx.nd.array(x[tr[:2]]))
        trainer = gluon.Trainer(head.collect_params(), "sgd", {"learning_rate": lr})
        loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
        for epoch in range(1, epochs + 1):
            for b in epoch_batches(len(tr), batch_size, seed, epoch):
                with autograd.record():
                    loss = loss_fn(head(mx.nd.array(x[tr[b]])), mx.nd.array(y[tr[b]]))
                loss.backward()
                trainer.step(len(b))
        oof[te] = predict_probs(head, x[te], ctx)[:, 1]
        for name, xa in (also or {}).items():
            oof_also.setdefault(name, np.zeros(len(y)))[te] = predict_probs(head, xa[te], ctx)[:, 1]
    auc = round(float(roc_auc_score(y, oof)), 4)
    if also is None:
        return auc
    return auc, {k: round(float(roc_auc_score(y, v)), 4) for k, v in oof_also.items()}


def jsrt_auc(shared, work, calib_paths, batch, only=None, seeds=(0,), fixed_only=False):
    from mxvision.data.jsrt import jsrt_index
    index = jsrt_index(shared / "data" / "jsrt", work / "jsrt.csv")
    variants = {"float32": {}, "bfloat16": {"dtype": "bfloat16"},
                "int8": {"dtype": "int8", "calibration": calib_paths},
                "float32, stored float16": {"storage_dtype": "float16"},
                "float32, pooled": {"pooled": True}}
    if only:
        variants = {k: v for k, v in variants.items() if k in set(only) | {"float32"}}
    feats, out = {}, {}
    for name, kw in variants.items():
        log(f"JSRT features: {name}")
        store = extract_features(index, work / f"jsrt-{name.replace(', ', '-').replace(' ', '')}",
                                 weights="none", ctx="cpu", batch_size=batch, progress=False, **kw)
        x, y, ids = store.load()
        order = np.argsort(ids)
        feats[name] = (x[order], y[order])
    y = feats["float32"][1]
    same_images = {k: x for k, (x, _) in feats.items() if k != "float32" and "pooled" not in k}
    log(f"JSRT 5-fold, heads trained on float32 scoring {list(same_images)} too, seeds {list(seeds)}")
    fixed = [cv_auc(feats["float32"][0], y, seed=s, also=same_images) for s in seeds]
    out["heads trained on float32"] = {
        "seeds": list(seeds), "float32": [a for a, _ in fixed],
        **{k: [b[k] for _, b in fixed] for k in same_images},
        "auc_change": {k: [round(b[k] - a, 4) for a, b in fixed] for k in same_images}}
    log(f"  {out['heads trained on float32']}")
    for name, (x, _) in feats.items():
        row = {"n": int(len(y))}
        if name in same_images:
            row.update(agreement(x, feats["float32"][0]))
        if name == "float32":
            aucs = out["heads trained on float32"]["float32"]
        elif fixed_only and name in same_images:
            out[name] = row
            continue
        else:
            log(f"JSRT 5-fold head training: {name}, seeds {list(seeds)}")
            aucs = [cv_auc(x, y, seed=s) for s in seeds]
        log(f"  {name}: cv AUC per seed {aucs}")
        row.update({"cv_auc": round(float(np.mean(aucs)), 4), "cv_auc_per_seed": aucs,
                    "cv_auc_seed_std": round(float(np.std(aucs)), 4)})
        out[name] = row
    base = out["float32"]["cv_auc"]
    for name, row in out.items():
        if "cv_auc" in row:
            row["auc_change"] = round(row["cv_auc"] - base, 4)
    return out


# --------------------------------------------------------------------------- end to end
def make_png_folder(jsrt_images, n, folder):
    """``n`` 512x512 PNGs (the JSRT images, copied cyclically) in a folder per class."""
    sources = sorted(jsrt_images.glob("*.png"))
    for k in range(n):
        src = sources[k % len(sources)]
        label = "nodule" if src.name.startswith("JPCLN") else "normal"
        (folder / label).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, folder / label / f"{k:05d}-{src.name}")
    return folder


def pack_folder(folder, work, workers, result):
    """Pack the PNG folder once (``mxvision data pack``, raw 224 px uint8 records) and return the
    pack's index CSV: decoding and resizing are then paid once, not on every extraction."""
    from mxvision.data.folder import index_from_folder
    from mxvision.data import recordio
    rec = work / "pack" / "pngs.rec"
    rec.parent.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    recordio.pack_index(index_from_folder(folder), rec, preset=PRESET, encoding="raw",
                        workers=workers, progress=False)
    seconds = time.perf_counter() - tic
    result["pack"] = {"seconds": round(seconds, 2), "encoding": "raw",
                      "bytes": os.path.getsize(rec), "images_per_s": None}
    csv = rec.with_suffix(".csv")
    from mxvision.data.index import read_index
    result["pack"]["images_per_s"] = round(len(read_index(csv)) / seconds, 2)
    log(f"packed in {seconds:.1f} s")
    return csv


def cpu_seconds():
    """CPU time of this process (every thread) and of its finished child processes."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def end_to_end(folder, work, dtype, calib_paths, batch, workers, loader="auto"):
    kw = {"dtype": dtype, "calibration": calib_paths} if dtype != "float32" else {}
    out = work / f"e2e-{dtype}"
    tic, cpu = time.perf_counter(), cpu_seconds()
    store = extract_features(folder, out, weights="none", ctx="cpu", batch_size=batch,
                             progress=False, loader=loader, workers=workers, overwrite=True, **kw)
    total, cpu = time.perf_counter() - tic, cpu_seconds() - cpu
    t = store.manifest["timing"]
    size = sum(s["bytes"] for s in store.manifest["shards"])
    shutil.rmtree(out, ignore_errors=True)
    return {"images": t["images"], "images_per_s": t["images_per_s"], "loop_seconds": t["loop_seconds"],
            "setup_seconds": t["setup_seconds"], "total_seconds": round(total, 2),
            "images_per_s_including_setup": round(t["images"] / total, 2),
            "shards_gb": round(size / 1e9, 2), "workers": workers, "loader": t["loader"],
            "cpu_ms_per_image": t["cpu_ms_per_image"],
            "cpu_ms_per_image_including_setup": round(1000 * cpu / t["images"], 2)}


# --------------------------------------------------------------------------- main
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=4, help="batches per engine per round")
    p.add_argument("--e2e-images", type=int, default=384)
    p.add_argument("--workers", type=int, default=2, help="decode workers (end to end)")
    p.add_argument("--loaders", nargs="+", default=["thread", "process"], choices=["thread", "process"],
                   help="decode in worker threads and/or processes (end to end; auto = thread)")
    p.add_argument("--e2e-rounds", type=int, default=2, help="paired model-only / end-to-end rounds")
    p.add_argument("--e2e-pack", action="store_true",
                   help="also extract from a RecordIO pack of the same images (packed once, timed)")
    p.add_argument("--calibration-images", type=int, default=64)
    p.add_argument("--skip-auc", action="store_true")
    p.add_argument("--auc-seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="head seeds per variant (mean and spread)")
    p.add_argument("--auc-variants", nargs="+", default=None,
                   help="only these JSRT variants (float32 is always included), e.g. bfloat16 int8")
    p.add_argument("--fixed-head-only", action="store_true",
                   help="score the other precisions only with the heads trained on float32 (no "
                        "training per precision: the AUC change with training noise held fixed)")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    shared = shared_dir()
    if shared is None or not (shared / "data" / "jsrt" / "images").is_dir():
        sys.exit("needs the JSRT images in ../shared/data/jsrt (set MXVISION_SHARED)")
    jsrt_images = shared / "data" / "jsrt" / "images"
    work = Path(tempfile.mkdtemp(prefix="mxvision-bench-"))
    os.environ["MXVISION_CACHE"] = str(work / "cache")  # calibrate once, reuse in every run below
    ctx = mx.cpu()
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(), "batch": args.batch,
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "weights": "RANDOM (seed 0): no pretrained weights on this machine",
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    try:
        paths = sorted(str(q) for q in jsrt_images.glob("*.png"))
        calib = [paths[k] for k in sorted(np.random.RandomState(0).permutation(len(paths))[:args.calibration_images])]
        x = np.stack([transforms.load_image(q, PRESET) for q in paths[:args.batch]])

        log("building the engines")
        net, info = zoo.build_backbone(weights="none", ctx=ctx)
        features_info = {"backbone": zoo.DEFAULT_BACKBONE, "cut": zoo.DEFAULT_CUT, "weights": info,
                         "preprocessing": PRESET.to_dict()}
        onnx_path, onnx_const = export_onnx(net, args.batch, work)
        tic = time.perf_counter()
        int8, int8_info = quantize.prepare(net, "int8", ctx, PRESET, features_info, work / "int8",
                                           calibration=calib)
        result["int8_calibration_seconds"] = round(time.perf_counter() - tic, 1)
        bf16, _ = quantize.prepare(net, "bfloat16", ctx, PRESET, features_info, work / "bf16")
        net32, _ = zoo.build_backbone(weights="none", ctx=ctx)  # a fresh float32 block
        threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count())
        engines = {"mxvision fp32": mxnet_engine(net32, ctx), "mxvision bf16": mxnet_engine(bf16, ctx),
                   "mxvision int8": mxnet_engine(int8, ctx),
                   "onnxruntime fp32": ort_engine(onnx_const, threads),
                   "onnxruntime fp32 (as exported)": ort_engine(onnx_path, threads)}
        ref = engines["mxvision fp32"](x)
        result["feature_agreement_vs_fp32"] = {
            k: agreement(engines[k](x), ref) for k in ("mxvision bf16", "mxvision int8", "onnxruntime fp32")}
        log("model-only throughput, interleaved rounds")
        speed = interleaved(engines, x, args.rounds, args.iters)
        peer = speed["onnxruntime fp32"]["median"]
        for row in speed.values():
            row["ratio_to_onnxruntime_fp32"] = round(row["median"] / peer, 2)
        result["model_only"] = speed

        if not args.skip_e2e:
            folder = make_png_folder(jsrt_images, args.e2e_images, work / "pngs")
            warm = make_png_folder(jsrt_images, args.batch, work / "warm")
            log("end to end: warm-up (caches the calibrated INT8 backbone)")
            end_to_end(warm, work, "int8", calib, args.batch, args.workers)
            result["end_to_end"] = {}
            sources = [("", folder)]
            if args.e2e_pack:
                sources.append((" from a RecordIO pack", pack_folder(folder, work, args.workers, result)))
            runs = [(f"{dtype}{label}, {loader} loader", dtype, key, source, loader)
                    for label, source in sources
                    for dtype, key in (("int8", "mxvision int8"), ("float32", "mxvision fp32"))
                    for loader in args.loaders]
            for name, dtype, key, source, loader in runs:
                rows = []
                for r in range(args.e2e_rounds):
                    # model only on as many images, right before: the same load conditions
                    n_batches = max(1, args.e2e_images // args.batch)
                    tic, cpu = time.perf_counter(), cpu_seconds()
                    for _ in range(n_batches):
                        engines[key](x)
                    model_rate = n_batches * args.batch / (time.perf_counter() - tic)
                    model_cpu = 1000 * (cpu_seconds() - cpu) / (n_batches * args.batch)
                    log(f"end to end round {r + 1}: {args.e2e_images} images -> shards, {name}")
                    row = end_to_end(source, work, dtype, calib, args.batch, args.workers, loader)
                    row["model_only_images_per_s"] = round(model_rate, 2)
                    row["model_only_cpu_ms_per_image"] = round(model_cpu, 2)
                    # With every core busy, files -> shards cannot beat model-only by more than
                    # the share of its CPU that is the network's: the arithmetic ceiling.
                    row["cpu_ceiling_fraction"] = round(model_cpu / row["cpu_ms_per_image"], 3)
                    row["fraction_of_model_only"] = round(row["images_per_s"] / model_rate, 3)
                    rows.append(row)
                    log(f"  {row}")
                result["end_to_end"][name] = {
                    "median_fraction_of_model_only": statistics.median(r["fraction_of_model_only"] for r in rows),
                    "rounds": rows}
        del engines
        if not args.skip_auc:
            result["jsrt"] = jsrt_auc(shared, work, calib, args.batch, args.auc_variants,
                                      args.auc_seeds, args.fixed_head_only)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["load_average_at_end"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


def machine_info():
    from mxvision.runtime import cpu_info

    model, flags = cpu_info()
    isa = [f for f in ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    return {"cpu": model, "cores": os.cpu_count(), "isa": isa, "python": platform.python_version(),
            "mxnet": mx.__version__, "onnxruntime": __import__("onnxruntime").__version__}


if __name__ == "__main__":
    main()
