"""Graph levers on top of mxvision's INT8 conversion: speed and feature error of each variant against
the conversion as shipped, timed in one process, on the Xvision trunk.

    .venv/bin/python bench/bench_int8_variants.py --work DIR [--rounds 30] [--variants ...]

What is left of the trunk's INT8 time outside its convolutions (docs/BENCHMARKS.md, "Conversion
version 9") is mostly stand-alone INT8 ReLUs and BatchNorms, the float32 BatchNorms at both ends
and reorders. Each variant re-expresses the float32 graph ``int8_graph.int8_ready`` gives (the same
function, checked here in float32) so that MXNet's INT8 pass runs fewer of them:

* ``fold-stage-ends``: ``fold_preact(stage_ends=True)``: the pre-activation BatchNorms after the
  last unit of each stage folded too (3 more), so MXNet fuses sum + ReLU into the convolution;
* ``fold-stage-ends-bn-pool``: that, and ``bn-pool`` below: no stand-alone INT8 BatchNorm left;
* ``bn-pool``: the stem's BatchNorm after the max pooling as a depthwise 1x1 convolution (its ReLU
  fuses into it; u8 in and out instead of a u8→s8 reorder, an INT8 BatchNorm and an INT8 ReLU);
* ``bn-pool-stage``: that, and the 3 stage-end BatchNorms the fold leaves, as convolutions;
* ``bn-pool-stage-tail``: that, and the final BatchNorm, then quantized too (MXNet's ``smart``
  mode kept it float32 as a BatchNorm).

Every network is calibrated as ``extract --dtype int8`` calibrates (``quantize.calibrate``: the
first 32 calibration films, 16 to calibrate on and 16 to choose the calibration by, the ReLUs
before a residual sum unfused where ``unfuse_relu_pays``), then all are timed in alternation
(``--rounds``, batch 16, two batches each per round, the order reversed every other round); the
figure is the median of the per-round ratios shipped time ÷ variant time (above 1: the variant is
faster). Feature error: relative L1 to float32 on the bench's 32 held-out films.

``--work``: a folder ``bench_int8_peers.py --work`` wrote (``fp32-symbol.json``, ``calibration.npy``,
``held_out.npy``, and ``weights.txt``, which says what weights the results are of); with
``--realistic-batchnorm`` there, the trunk's BatchNorms are not identities.
RANDOM weights: speed does not depend on them, the errors only describe this network.
"""
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from bench_int8_unfuse import WORK_FILES, alternate, bound, checked_work, work_parser

BENCH = Path(__file__).resolve().parent
VARIANTS = ("fold-stage-ends", "fold-stage-ends-bn-pool", "bn-pool", "bn-pool-stage", "bn-pool-stage-tail")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def variant_graph(name, sym, arg, aux):
    """``(sym, arg, aux, rewritten)`` of a variant, from the float32 trunk as saved by the peers bench."""
    from mxvision.features.int8_graph import batchnorms_as_convs, fold_preact, int8_ready
    if name == "shipped":
        sym, arg, aux, counts = int8_ready(sym, arg, aux)
        return sym, arg, aux, counts["bn_folded"]
    if name.startswith("fold-stage-ends"):
        sym, arg, aux, _ = int8_ready(sym, arg, aux, fold=False)
        sym, arg, aux, folded = fold_preact(sym, arg, aux, stage_ends=True)
        if name == "fold-stage-ends":
            return sym, arg, aux, folded
        sym, arg, aux, converted = batchnorms_as_convs(sym, arg, aux, after=("Pooling",))
        return sym, arg, aux, folded + converted
    sym, arg, aux, _ = int8_ready(sym, arg, aux)
    after = ("Pooling",) if name == "bn-pool" else ("Pooling", "elemwise_add")
    return batchnorms_as_convs(sym, arg, aux, after=after, tail=name.endswith("-tail"))


def main(argv=None):
    p = work_parser(__doc__, rounds=30)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = p.parse_args(argv)
    checked_work(args, needs=WORK_FILES + ("weights.txt",))
    import mxvision  # noqa: F401  (before MXNet: NumPy compatibility, AMX)
    import mxnet as mx
    from bench_extract import machine_info
    from mxvision.features import quantize
    load_at_start = os.getloadavg()
    calib, held = np.load(args.work / "calibration.npy")[:32], np.load(args.work / "held_out.npy")
    fp32 = mx.model.load_checkpoint(str(args.work / "fp32"), 0)
    want = quantize.graph_outputs(*fp32, held)
    rows, runs = {}, {}
    for name in ("shipped", *args.variants):
        tic = time.time()
        sym, arg, aux, rewritten = variant_graph(name, *fp32)
        float32_error = quantize.feature_error(want, quantize.graph_outputs(sym, arg, aux, held))
        if float32_error > 1e-4:
            sys.exit(f"{name}: not the same function in float32 (relative L1 {float32_error:.2g})")
        qsym, qarg, qaux, record = quantize.calibrate(sym, arg, aux, calib)
        ops = [n["op"] for n in json.loads(qsym.tojson())["nodes"] if n["op"] != "null"]
        rows[name] = {"rewritten": rewritten, "float32_error": float32_error,
                      "feature_error": round(quantize.feature_error(want, quantize.graph_outputs(qsym, qarg, qaux, held)), 4),
                      "calibration": record["chosen"], "relu_unfused": record["relu_unfused"],
                      "int8_operators": {o: ops.count(o) for o in sorted(set(ops))},
                      "convert_seconds": round(time.time() - tic, 1)}
        log(f"{name}: {rewritten} rewritten, {record['chosen']} calibration, feature error "
            f"{rows[name]['feature_error']}, operators {rows[name]['int8_operators']}")
        runs[name] = bound(qsym, qarg, qaux, held, 16)
    times = {k: np.array(v) for k, v in alternate(runs, args.rounds).items()}
    for name, row in rows.items():
        row.update(ms_per_batch=round(1000 * float(np.median(times[name])), 1),
                   shipped_over_this_paired=round(float(np.median(times["shipped"] / times[name])), 3))
        print(f"{name:20s} {row['ms_per_batch']:7.1f} ms per batch of 16   shipped/this {row['shipped_over_this_paired']:.3f}"
              f"   feature error {row['feature_error']:.4f}")
    out = args.out or BENCH / "results" / time.strftime("int8-variants-%Y%m%d-%H%M.json")
    out.write_text(json.dumps({"command": " ".join([".venv/bin/python", "bench/bench_int8_variants.py", *sys.argv[1:]]),
                               "machine": machine_info(), "weights": (args.work / "weights.txt").read_text(),
                               "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg(),
                               "unfuse_relu_pays": quantize.unfuse_relu_pays(), "rounds": args.rounds,
                               "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
