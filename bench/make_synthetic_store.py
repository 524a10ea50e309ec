"""Write a synthetic feature store of any size (default: 50,000 images at 2048x7x7, ~20 GB float32).

For benchmarking training on features larger than RAM without extracting them first: the store has
the exact layout ``mxvision extract`` writes (manifest, shards with sha256), ReLU-like non-negative
features, and a learnable class signal (nodule rows are brighter in the first 64 channels), with a
70/15/15 train/val/test split. Shards are generated one at a time, so memory stays ~3 shards.

    python bench/make_synthetic_store.py --out ../bench-data/store50k            # ~20 GB
    python bench/make_synthetic_store.py --out /tmp/s --n 2000 --storage-dtype float16

Check free disk first (``df -h``); delete the store after measuring.
"""
import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mxvision  # noqa: E402,F401  (first: restores the NumPy names MXNet reads, mxvision.runtime.compat)
import mxnet as mx  # noqa: E402

from mxvision.features.extract import FORMAT_VERSION, MANIFEST  # noqa: E402
from mxvision.utils import atomic_path, write_json  # noqa: E402


def make_store(out, n=50000, shape=(2048, 7, 7), shard_size=256, storage_dtype="float32", seed=0,
               signal=0.15, progress=True):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    labels = (rng.rand(n) < 0.4).astype(int)
    splits = rng.choice(["train", "val", "test"], size=n, p=[0.7, 0.15, 0.15])
    classes = ["normal", "nodule"]
    items = [{"id": f"synthetic/{i:06d}.png", "path": f"synthetic/{i:06d}.png", "label": classes[lab],
              "label_id": int(lab), "patient_id": f"p{i:06d}", "split": str(s)}
             for i, (lab, s) in enumerate(zip(labels, splits))]
    shards, tic = [], time.time()
    for start in range(0, n, shard_size):
        stop = min(start + shard_size, n)
        g = np.random.default_rng([seed, start])
        x = g.standard_normal((stop - start,) + tuple(shape), dtype=np.float32)
        x[:, :64] += signal * labels[start:stop, None, None, None].astype(np.float32) * 4
        np.maximum(x, 0, out=x)
        name = f"shard-{start:07d}.nd"
        with atomic_path(out / name) as tmp:
            mx.nd.save(tmp, {"features": mx.nd.array(x, dtype=storage_dtype)})
        data = (out / name).read_bytes()
        shards.append({"file": name, "start": start, "stop": stop, "rows": list(range(start, stop)),
                       "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        del data, x
        if progress and (start // shard_size) % 20 == 0:
            print(f"  {stop}/{n} rows, {time.time() - tic:.0f} s", flush=True)
    manifest = {
        "format_version": FORMAT_VERSION, "backbone": "resnet50_v2", "cut": "stage4_unit2_relu1",
        "weights": {"spec": "synthetic", "file": None, "sha1": "synthetic", "random_seed": seed,
                    "description": "SYNTHETIC features (bench/make_synthetic_store.py), no network"},
        "preprocessing": {"name": "imagenet224", "size": 224, "channels": 3,
                          "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "shard_size": shard_size, "classes": classes, "dtype": "float32",
        "storage_dtype": storage_dtype, "pooled": False, "items": items, "splits_assigned": None,
        "shards": shards, "skipped": [], "feature_shape": list(shape), "precision": None,
        "complete": True, "ctx": "cpu(0)", "mxnet_version": mx.__version__,
        "n_features": n, "n_skipped": 0}
    write_json(out / MANIFEST, manifest)
    return out, sum(s["bytes"] for s in shards), time.time() - tic


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=50000)
    p.add_argument("--shape", type=int, nargs="+", default=[2048, 7, 7])
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--storage-dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out, size, secs = make_store(args.out, args.n, tuple(args.shape), args.shard_size,
                                 args.storage_dtype, args.seed)
    print(f"wrote {args.n} rows of {tuple(args.shape)} {args.storage_dtype} to {out}: "
          f"{size / 1e9:.2f} GB in {secs:.0f} s (free: {os.statvfs(out).f_bavail * os.statvfs(out).f_frsize / 1e9:.0f} GB)")


if __name__ == "__main__":
    main()
