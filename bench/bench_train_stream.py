"""Train the Xvision head on a feature store larger than RAM, streaming shards; report peak RSS.

    python bench/make_synthetic_store.py --out ../bench-data/store50k      # ~20 GB, once
    python bench/bench_train_stream.py --store ../bench-data/store50k --epochs 1

Prints the epoch time, training samples/s (train rows / epoch seconds, the epoch including its
validation pass), validation AUC and the peak resident memory of this process (ru_maxrss, which
does not count the page cache). Deletes its run folder afterwards (checkpoints are ~200 MB each).
"""
import argparse
import json
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mxvision.features.extract import FeatureStore  # noqa: E402
from mxvision.features.stream import DEFAULT_MAX_MEMORY  # noqa: E402
from mxvision.train.loop import train_head  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-memory", type=int, default=DEFAULT_MAX_MEMORY, help="bytes of feature rows in memory")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()
    store = FeatureStore(args.store)
    n_train, n_val = store.count("train"), store.count("val")
    size = sum(s["bytes"] for s in store.manifest["shards"])
    run = Path(tempfile.mkdtemp(prefix="mxvision-stream-run-"))
    tic = time.time()
    try:
        state = train_head(store, run, epochs=args.epochs, batch_size=args.batch_size, ctx="cpu",
                           keep_checkpoints=1, max_memory=args.max_memory, progress=False)
        config = json.loads((run / "config.json").read_text())
    finally:
        shutil.rmtree(run, ignore_errors=True)
    total = time.time() - tic
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    last = state["history"][-1]
    result = {
        "store": str(store.path), "rows": len(store.items), "feature_shape": store.feature_shape,
        "storage_dtype": store.storage_dtype, "store_gb": round(size / 1e9, 2),
        "n_train": n_train, "n_val": n_val, "streaming": config.get("streaming"),
        "epochs": args.epochs, "epoch_seconds": [r["seconds"] for r in state["history"]],
        "train_samples_per_s": round(n_train / last["seconds"], 1),
        "val_auc": round(last["val_auc"], 4), "train_loss": round(last["train_loss"], 4),
        "total_seconds": round(total, 1), "peak_rss_gb": round(peak_gb, 2),
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
