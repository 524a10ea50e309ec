"""The peer pipeline of bench/bench_e2e_peers.py: files -> features with OpenVINO INT8, as a user
would write it. Runs in the peer venv (.venv-peers: OpenVINO, OpenCV, NumPy 2), not in mxvision's.

    .venv-peers/bin/python bench/peer_pipeline_openvino.py --index jsrt.csv --model ov-int8.xml --out DIR

Decoding and preprocessing run in a thread pool (OpenCV releases the GIL) one batch ahead of the
network; the preprocessing is mxvision's ``imagenet224`` preset restated with OpenCV and NumPy
(grey levels scaled to [0, 1] by the sample's full scale, the largest centred square, INTER_AREA
down to 224 px, clipped, replicated to 3 channels, ImageNet mean/std), so both pipelines compute the
same features (the bench checks it). The features of every film go to one ``features.npy`` shard
(float32, in index order), written to a temporary name and renamed, with the paths in
``paths.txt``. Prints one JSON line: images, seconds spent before the first batch, loop seconds.

``--streams N`` (N > 1): OpenVINO's ``THROUGHPUT`` hint with ``NUM_STREAMS=N`` and N infer requests,
consecutive batches started asynchronously on them in turn, as OpenVINO's documentation advises for
throughput (the default is the ``LATENCY`` hint, one stream).
"""
import argparse
import csv
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import openvino as ov

MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)
SIZE = 224


def load(path):
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise SystemExit(f"{path}: cannot decode")
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    img = img.astype(np.float32) / float(np.iinfo(img.dtype).max)
    h, w = img.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    img = np.ascontiguousarray(img[top:top + side, left:left + side])
    if side != SIZE:
        img = cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_AREA if side > SIZE else cv2.INTER_LINEAR)
    img = np.clip(img, 0.0, 1.0)
    return (img[None] - MEAN) / STD


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--index", required=True, help="CSV with a path column")
    p.add_argument("--model", required=True, help="OpenVINO IR (.xml) or ONNX")
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--streams", type=int, default=1)
    args = p.parse_args()
    if args.streams < 1 or args.batch < 1 or args.threads < 1:
        raise SystemExit("--streams, --batch and --threads must be >= 1")
    tic = time.perf_counter()
    with open(args.index, newline="") as f:
        paths = [row["path"] for row in csv.DictReader(f)]
    core = ov.Core()
    model = core.read_model(args.model)
    model.reshape([args.batch, 3, SIZE, SIZE])
    hint = "LATENCY" if args.streams == 1 else "THROUGHPUT"
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": args.threads,
                                                 "NUM_STREAMS": args.streams, "PERFORMANCE_HINT": hint})
    requests = [compiled.create_infer_request() for _ in range(args.streams)]
    batches = [paths[k:k + args.batch] for k in range(0, len(paths), args.batch)]
    out = None
    running = {}  # request -> (batch number, films in it)

    def collect(r):
        nonlocal out
        k, n = running.pop(r)
        requests[r].wait()
        y = requests[r].get_output_tensor(0).data[:n]
        if out is None:
            out = np.empty((len(paths),) + y.shape[1:], np.float32)
        out[k * args.batch:k * args.batch + n] = y

    with ThreadPoolExecutor(args.threads) as pool:
        pending = pool.map(load, batches[0]) if batches else None
        setup = time.perf_counter() - tic
        for k, chunk in enumerate(batches):
            images = np.stack(list(pending))
            if k + 1 < len(batches):
                pending = pool.map(load, batches[k + 1])  # decode the next batch while this one runs
            x = np.zeros((args.batch, 3, SIZE, SIZE), np.float32)
            x[:len(chunk)] = images
            r = k % args.streams
            if r in running:  # the request's previous batch: its output is read before it is reused
                collect(r)
            running[r] = (k, len(chunk))
            if args.streams == 1:  # one stream: as before, a synchronous call
                requests[0].infer({0: x})
                collect(0)
            else:
                requests[r].start_async({0: x})
        for r in sorted(running, key=lambda r: running[r][0]):
            collect(r)
    os.makedirs(args.out, exist_ok=True)
    tmp = os.path.join(args.out, ".features.npy.tmp")
    with open(tmp, "wb") as f:
        np.save(f, out)
    os.replace(tmp, os.path.join(args.out, "features.npy"))
    with open(os.path.join(args.out, "paths.txt"), "w") as f:
        f.write("\n".join(paths) + "\n")
    print(json.dumps({"images": len(paths), "setup_seconds": round(setup, 3),
                      "loop_seconds": round(time.perf_counter() - tic - setup, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
