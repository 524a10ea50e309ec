"""``mxvision classify --dtype int8`` on real films: does its check refuse or accept, by how much,
and how fast is it against float32 ``classify`` (issue #16 item 3).

    .venv/bin/python bench/bench_xrv_classify_int8.py [--films 27] [--calibration 32] [--repeat 5]

Weights and films are bench_xrv_reduced.py's (the parity suite's realistic random weights, the 5
sample films and ``--films`` JSRT films scored; ``--calibration`` *other* JSRT films given as
``calibration=``: half calibrate, half are the check). For each port it calls
:func:`mxvision.inference.classify` as the command line does:

* float32 (the default);
* INT8 at the default tolerance 0.02: accepted or refused, and the one line it refuses with;
* INT8 at tolerance 1 (accepts whatever it measures): the largest difference its check found,
  and the largest difference on the scored films themselves (not seen by the check);

and times scoring the films (median of ``--repeat`` calls, after the conversion is cached), float32
against INT8. Prints the machine's load at the start.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import bench_xrv_reduced  # noqa: E402  (its weights and films)

MODELS = ("densenet121-res224-all", "resnet50-res512-all")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--films", type=int, default=27, help="JSRT films scored besides the 5 samples")
    ap.add_argument("--calibration", type=int, default=32, help="other JSRT films: half calibrate, half check")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ["MXVISION_CACHE"] = tempfile.mkdtemp(prefix="bench-xrv-classify-int8-cache-")
    import mxvision  # noqa: F401  (first: restores what MXNet reads)
    from mxvision.errors import MxvisionError
    from mxvision.inference import classify
    from mxvision.models.xrv.common import WEIGHTS

    files, calib_files, folder = bench_xrv_reduced.realistic_ports(args.films, args.calibration)
    print("load average at start: %s; %d films scored, %d calibration films; weights RANDOM (realistic "
          "BatchNorm, seed 0/1)" % (" / ".join("%.2f" % v for v in os.getloadavg()), len(files), len(calib_files)),
          flush=True)
    print("| model | at 0.02 | check: max diff (films) | scored films: max diff / share > 0.02 | "
          "float32 ms per film | INT8 ms per film | INT8 speed-up |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in MODELS:
        options = dict(model=name, weights=os.path.join(folder, WEIGHTS[name].file), batch_size=args.batch)
        t0 = time.perf_counter()
        try:
            classify(files[:1], dtype="int8", calibration=calib_files, **options)
            verdict = "accepted"
        except MxvisionError as err:
            verdict = "refused: `%s`" % err
        first = time.perf_counter() - t0
        int8 = classify(files, dtype="int8", calibration=calib_files, int8_tolerance=1.0, **options)
        fp32 = classify(files, **options)
        reason = {k for r in fp32 for k, v in r["scores"].items() if v is None}
        diff = np.array([[abs(a["scores"][k] - b["scores"][k]) for k in a["scores"] if k not in reason]
                         for a, b in zip(fp32, int8)])
        times = {}
        for dtype, extra in (("float32", {}), ("int8", dict(dtype="int8", calibration=calib_files,
                                                            int8_tolerance=1.0))):
            runs = []
            for _ in range(args.repeat):
                tic = time.perf_counter()
                classify(files, **options, **extra)
                runs.append((time.perf_counter() - tic) * 1000 / len(files))
            times[dtype] = statistics.median(runs)
        check = int8[0]["int8"]
        print("| %s | %s | %.3f (%d) | %.3f / %.1f%% | %.1f | %.1f | %.2f |" % (
            name, verdict, check["max_score_difference"], check["films"], diff.max(),
            100 * (diff > 0.02).mean(), times["float32"], times["int8"], times["float32"] / times["int8"]),
            flush=True)
        print("  (the first INT8 call, converting and checking: %.0f s)" % first)


if __name__ == "__main__":
    main()
