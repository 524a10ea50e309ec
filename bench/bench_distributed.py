"""Distributed extraction and head training at 1 and 2 workers on this machine; prints JSON.

    .venv/bin/python bench/bench_distributed.py --json /tmp/dist-bench/bench.json

Three parts, each a real local cluster (scheduler + 1 server + 2 workers, separate processes on
127.0.0.1, :func:`mxvision.distributed.cluster.run_local`) against the single process:

1. **extraction**: a synthetic radiograph index (``--images``) through the ResNet-50 v2 trunk
   (random seeded weights, 2048x7x7 fp32), one process vs 2 workers; wall time, per-share
   times, bytes on disk per image, and the largest feature difference between the two stores;
2. **kvstore**: the time of one ``pushpull`` (push + pull through the server) of an fp32 array
   the size of the head's first Dense layer (100,352 x 512 = 51.4M weights, 205.5 MB), per worker;
3. **training**: a synthetic 2048x7x7 store (``--rows``, bench/make_synthetic_store.py) trained
   ``--epochs`` with global batch ``--batch-size``: ``train_head`` (1 process), the 2-worker
   cluster, and ``simulate=2``; epoch times, final metrics and weight differences.

On a 2-core machine 2 workers cannot compute faster than 1 process using both cores: the
figures measure the overheads and the bandwidth, not a speed-up. Work files go to ``--work``
(default: a temporary folder, deleted afterwards).
"""
import argparse
import datetime
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mxvision  # noqa: E402,F401  (first: restores the NumPy names MXNet reads, mxvision.runtime.compat)
import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402

from mxvision.distributed.cluster import run_local  # noqa: E402
from mxvision.data.synth import make_synthetic_dataset  # noqa: E402
from mxvision.distributed.train import train_distributed  # noqa: E402
from mxvision.features.extract import FeatureStore, extract_features  # noqa: E402
from mxvision.train.loop import train_head  # noqa: E402

CLI = [sys.executable, "-m", "mxvision.cli.distributed"]
FC1_WEIGHTS = 100352 * 512
KV_SCRIPT = """
import json, sys, time
import mxvision  # first: the NumPy names MXNet reads (NumPy 2)
import mxnet as mx
kv = mx.kv.create("dist_sync")
n, reps, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
grad = mx.nd.ones((n,)) * (kv.rank + 1)
kv.init(0, mx.nd.zeros((n,)))
times = []
for rep in range(reps + 1):  # the first is a warm-up
    out = grad.copy()  # pushpull writes the sum into the pushed CPU array too: push a fresh one
    out.wait_to_read()
    tic = time.time()
    kv.pushpull(0, out, out=out)
    out.wait_to_read()
    times += [time.time() - tic] if rep else []
assert abs(out[0].asscalar() - sum(range(1, kv.num_workers + 1))) < 1e-6
json.dump({"rank": kv.rank, "seconds": times}, open(f"{out_dir}/kv-{kv.rank}.json", "w"))
"""


def _store_bytes(path):
    m = FeatureStore(path).manifest
    return sum(s["bytes"] for s in m["shards"]), m["n_features"]


def bench_extraction(work, images, backbone, batch, shard):
    index = make_synthetic_dataset(work / "synth", n_per_class=images // 2, size=256, seed=0)
    opts = dict(backbone=backbone, weights="none", ctx="cpu", batch_size=batch, shard_size=shard)
    tic = time.time()
    single = extract_features(index, work / "f1", progress=False, **opts)
    t1 = time.time() - tic
    argv = ["extract", "--index", index, "--out", work / "f2", "--quiet"] + \
        [a for k, v in opts.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    tic = time.time()
    result = run_local(CLI + [str(a) for a in argv], workers=2, servers=1, timeout=3600,
                       log_dir=work / "logs-extract")
    t2 = time.time() - tic
    dist = FeatureStore(work / "f2")
    diff = max(float(np.abs(dist.read_shard(a) - single.read_shard(b)).max())
               for a, b in zip(dist.manifest["shards"], single.manifest["shards"]))
    size, n = _store_bytes(work / "f1")
    return {"images": n, "backbone": backbone, "feature_shape": single.manifest["feature_shape"],
            "batch_size": batch, "shard_size": shard,
            "one_process": {"wall_s": round(t1, 2), "timing": single.manifest["timing"]},
            "two_workers": {"wall_s": round(t2, 2), "cluster_s": result.seconds,
                            "shares": dist.manifest["timing"]["shares"]},
            "shard_bytes": size, "bytes_per_image": size / n,
            "max_abs_feature_difference": diff,
            "sha256_identical": [s["sha256"] for s in dist.manifest["shards"]] ==
                                [s["sha256"] for s in single.manifest["shards"]]}


def bench_kvstore(work, elems, reps):
    out = work / "kv"
    out.mkdir()
    tic = time.time()
    run_local([sys.executable, "-c", KV_SCRIPT, str(elems), str(reps), str(out)], workers=2, servers=1,
              timeout=1800, log_dir=work / "logs-kv")
    per_rank = [json.loads(p.read_text()) for p in sorted(out.glob("kv-*.json"))]
    med = float(np.median([t for r in per_rank for t in r["seconds"]]))
    return {"elements": elems, "mbytes": elems * 4 / 1e6, "reps": reps, "workers": 2, "servers": 1,
            "pushpull_s_median": round(med, 3),
            "per_worker_mbytes_per_s": round(2 * elems * 4 / 1e6 / med, 1),  # pushed + pulled
            "per_rank_s": per_rank, "wall_s": round(time.time() - tic, 2)}


def _params(path):
    return {k: v.asnumpy() for k, v in mx.nd.load(str(path)).items()}


def bench_training(work, rows, epochs, batch):
    from make_synthetic_store import make_store
    store_dir = work / "store"
    make_store(store_dir, n=rows, shard_size=64, progress=False)
    store = FeatureStore(store_dir)
    hyper = dict(epochs=epochs, batch_size=batch, lr=0.01, seed=0)
    tic = time.time()
    plain = train_head(store, work / "run-plain", ctx="cpu", progress=False, keep_checkpoints=0, **hyper)
    t_plain = time.time() - tic
    argv = ["train", "--features", store_dir, "--out", work / "run-dist", "--ctx", "cpu", "--quiet",
            "--keep-checkpoints", "0"] + [a for k, v in hyper.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    tic = time.time()
    result = run_local(CLI + [str(a) for a in argv], workers=2, servers=1, timeout=3600,
                       log_dir=work / "logs-train")
    t_dist = time.time() - tic
    dist = json.loads((work / "run-dist" / "state.json").read_text())
    tic = time.time()
    sim = train_distributed(store, work / "run-sim", simulate=2, ctx="cpu", progress=False,
                            keep_checkpoints=0, **hyper)
    t_sim = time.time() - tic
    last = f"epoch-{epochs:04d}.params"
    p_dist, p_sim = _params(work / "run-dist/checkpoints" / last), _params(work / "run-sim/checkpoints" / last)
    p_plain = _params(work / "run-plain/checkpoints" / last)
    trained = [k for k in p_dist if "running" not in k]
    config = json.loads((work / "run-dist" / "config.json").read_text())["distributed"]
    return {"rows": {s: store.count(s) for s in ("train", "val")}, "hyper": hyper,
            "distributed": config,
            "one_process": {"wall_s": round(t_plain, 2), "history": plain["history"]},
            "two_workers": {"wall_s": round(t_dist, 2), "cluster_s": result.seconds,
                            "history": dist["history"]},
            "simulated_two": {"wall_s": round(t_sim, 2), "history": sim["history"]},
            "dist_vs_simulated_max_abs_param_diff": max(float(np.abs(p_dist[k] - p_sim[k]).max())
                                                        for k in p_dist),
            "dist_vs_one_process_rel_weight_diff": {
                k: round(float(np.linalg.norm(p_dist[k] - p_plain[k]) / np.linalg.norm(p_plain[k])), 4)
                for k in trained}}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--backbone", default="resnet50_v2")
    p.add_argument("--extract-batch", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=16)
    p.add_argument("--kv-elements", type=int, default=FC1_WEIGHTS)
    p.add_argument("--kv-reps", type=int, default=5)
    p.add_argument("--rows", type=int, default=768)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--parts", default="extract,kv,train")
    p.add_argument("--work", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="mxvision-dist-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    out = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.processor()
           or platform.machine(), "mxnet": mx.__version__, "command": " ".join(sys.argv)}
    try:
        if "extract" in parts:
            out["extraction"] = bench_extraction(work, args.images, args.backbone, args.extract_batch,
                                                 args.shard_size)
            print(json.dumps(out["extraction"], indent=1), flush=True)
        if "kv" in parts:
            out["kvstore"] = bench_kvstore(work, args.kv_elements, args.kv_reps)
            print(json.dumps(out["kvstore"], indent=1), flush=True)
        if "train" in parts:
            out["training"] = bench_training(work, args.rows, args.epochs, args.batch_size)
            print(json.dumps(out["training"], indent=1), flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
