"""How far INT8 moves the torchxrayvision ports' calibrated scores, for the quantizer's settings a user
would try first (issue #16 item 3: an INT8 ``classify`` must stay within 0.02 of float32).

    .venv/bin/python bench/bench_xrv_int8_accuracy.py [--models densenet121-res224-all ...]
                                                      [--films 27] [--calibration 32]

Weights, films and calibration films are bench_xrv_reduced.py's (the parity suite's realistic
random weights; the 5 sample films and ``--films`` JSRT films scored, ``--calibration`` other JSRT
films to calibrate on). Each variant is ``mxvision.features.quantize.convert`` (the graph
re-expressed by ``int8_graph``, then MXNet's oneDNN quantization) with one setting changed from
``entropy``; all calibrate on all ``--calibration`` films, except ``as extract``:

* ``as extract``: what ``extract --dtype int8`` does since conversion version 8: calibrated on half
  the films, the calibration (entropy, naive, 99.99th or 99.999th percentile) chosen by agreement
  with float32 on the other half (``quantize.calibrate``), per-tensor weights;
* ``entropy``: entropy calibration on all the films, per-tensor weights (``extract`` before
  version 8);
* ``channel-wise``: per-output-channel weight scales;
* ``naive``: min/max calibration instead of entropy, channel-wise;
* ``first and last float32``: the first convolution and the classifier left in float32;
* ``only stage 1`` / ``only the last stage``: every other convolution left in float32.

Prints, per variant, the calibrated scores' distance to float32 (max, p99, mean, share beyond
0.02). Accuracy only: the figures do not depend on the machine's load (speed: bench_xrv_reduced.py).
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import bench_xrv_reduced  # noqa: E402  (its weights and films)

#: the first and the last stage of each port, by the names of their convolutions
STAGES = {"densenet121-res224-all": ("_denseblock1_", "_denseblock4_"),
          "resnet50-res512-all": ("_layer1_", "_layer4_")}


def variants(names, first_stage, last_stage):
    """Name -> ``quantize.convert`` options; ``names``: the convolutions and FullyConnected of the
    graph the quantizer sees, in order."""
    def only(part):
        return [n for n in names if part not in n]
    return {
        "as extract": {},
        "entropy": {"calib_mode": "entropy"},
        "channel-wise": {"quantize_granularity": "channel-wise"},
        "naive, channel-wise": {"calib_mode": "naive", "quantize_granularity": "channel-wise"},
        "first and last float32": {"excluded_sym_names": [names[0], names[-1]]},
        "only stage 1": {"excluded_sym_names": only(first_stage)},
        "only the last stage": {"excluded_sym_names": only(last_stage)},
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(STAGES), choices=list(STAGES))
    ap.add_argument("--films", type=int, default=27)
    ap.add_argument("--calibration", type=int, default=32)
    args = ap.parse_args(argv)
    import mxvision  # noqa: F401  (first: restores what MXNet reads)
    import mxnet as mx
    from mxvision.data.xrv_transforms import load_xray, preprocess
    from mxvision.features import quantize
    from mxvision.features.int8_graph import int8_ready
    from mxvision.models import zoo
    from mxvision.models.xrv.common import WEIGHTS

    files, calib_files, tmp = bench_xrv_reduced.realistic_ports(args.films, args.calibration)
    print("%d films scored, %d to calibrate on; weights RANDOM (realistic BatchNorm, seed 0/1)"
          % (len(files), len(calib_files)), flush=True)
    print("| model | variant | convolutions in INT8 | max abs diff | p99 | mean | share > 0.02 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models:
        res = WEIGHTS[name].resolution
        net = zoo.get_model(name, weights=os.path.join(tmp, WEIGHTS[name].file))
        net.hybridize(static_alloc=True, static_shape=True)
        X = np.stack([preprocess(load_xray(f), res) for f in files]).astype(np.float32)
        calib = np.stack([preprocess(load_xray(f), res) for f in calib_files]).astype(np.float32)
        fp = np.concatenate([net(mx.nd.array(X[i:i + 8])).asnumpy() for i in range(0, len(X), 8)])
        net.export(os.path.join(tmp, name), 0)  # the graph convert quantizes, for its node names
        sym = int8_ready(*mx.model.load_checkpoint(os.path.join(tmp, name), 0))[0]
        names = [n["name"] for n in json.loads(sym.tojson())["nodes"]
                 if n["op"] in ("Convolution", "FullyConnected")]
        for label, options in variants(names, *STAGES[name]).items():
            tic = time.perf_counter()
            qsym, qarg, qaux, _ = quantize.convert(net, "int8", mx.cpu(), "xrv%d" % res, calib, **options)
            folder = tempfile.mkdtemp(dir=tmp)
            block = quantize.load_block(folder, quantize.save(folder, "int8", qsym, qarg, qaux, {}), mx.cpu())
            block.hybridize(static_alloc=True, static_shape=True)
            low = np.concatenate([net.postprocess(block(mx.nd.array(X[i:i + 8]))).asnumpy()
                                  for i in range(0, len(X), 8)])
            diff = np.abs(low - fp)[~np.isnan(fp)]
            n_int8 = len(names) - len(options.get("excluded_sym_names", ()))
            print("| %s | %s | %d of %d | %.3f | %.3f | %.4f | %.1f%% |" % (
                name, label, n_int8, len(names), diff.max(), np.percentile(diff, 99), diff.mean(),
                100 * np.mean(diff > 0.02)), flush=True)
            print("  (%s: converted in %.0f s)" % (label, time.perf_counter() - tic), file=sys.stderr)
            net.hybridize(static_alloc=True, static_shape=True)  # convert exported it: back to fused


if __name__ == "__main__":
    main()
