"""The ReLUs before a residual sum, fused or not (conversion version 9): speed and feature error of
mxvision's INT8 conversion both ways, per network, on this CPU.

    .venv/bin/python bench/bench_int8_unfuse.py --work DIR [--rounds 40] [--threads 2]

Since conversion version 9, ``quantize.calibrate`` leaves the ReLU out of each convolution that
feeds a convolution with a residual sum (``int8_graph.unfuse_relu``) where
``quantize.unfuse_relu_pays`` says so (AVX-512 VNNI, no AMX). This converts each network twice
with the same calibration films (``calibrate(..., unfuse=False)`` and
``unfuse=True``; each chooses its calibration the same way) and times the two INT8 networks in one process, alternating every two batches
(``--rounds`` pairs, the order swapped each round), so that a noisy host slows both alike; the
figure is the median of the per-round ratios (fused time / unfused time: above 1, unfusing is
faster). Feature error: relative L1 to float32 on held-out films.

Networks (RANDOM weights; speed does not depend on them):

* the Xvision trunk of ``bench_int8_peers.py`` with its BatchNorms as that bench leaves them
  (``--work``: a folder that bench wrote, holding ``fp32-symbol.json``, ``calibration.npy`` and
  ``held_out.npy``; the first 32 calibration films, which ``calibrate`` splits as always: 16 to
  calibrate on, 16 to choose the calibration by; the error on the bench's 32 held-out films;
  batch 16);
* torchxrayvision's DenseNet-121 (224 px, batch 8) and ResNet-50 (512 px, batch 4) ports, with
  random BatchNorm statistics, on the same films (one channel, scaled to [-1024, 1024], resized
  bilinearly to 512 px for the ResNet; 16 given to ``calibrate``, 16 held out).

On a network with no such ReLU (DenseNet) both conversions are the same graph: their paired ratio
shows the method's noise.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def xrv_port(kind, films, batch):
    """``(sym, arg, aux, calib, held, batch)`` of a torchxrayvision port with random weights and
    BatchNorm statistics drawn around 1 and 0 (so that they are not identities)."""
    import mxvision  # noqa: F401  (before MXNet: NumPy compatibility, AMX)
    import mxnet as mx
    from mxvision.models.xrv.densenet import XRVDenseNet
    from mxvision.models.xrv.resnet import XRVResNet
    sys.path.insert(0, str(BENCH.parent / "tests"))
    from support.graphs import random_batchnorm  # the tests' BatchNorms that are not identities
    net, size = (XRVDenseNet(), 224) if kind == "densenet121" else (XRVResNet(), 512)
    net.init_random(mx.cpu())
    random_batchnorm(net, np.random.RandomState(0))
    x = films[:, :1]
    if size != x.shape[-1]:
        x = mx.nd.contrib.BilinearResize2D(mx.nd.array(x), height=size, width=size).asnumpy()
    x = (1024 * (x - x.min()) / (x.max() - x.min()) * 2 - 1024).astype(np.float32)
    net.hybridize()
    net(mx.nd.array(x[:batch])).wait_to_read()
    prefix = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bench-int8-unfuse-{kind}-{os.getpid()}")
    net.export(prefix, 0)
    sym, arg, aux = mx.model.load_checkpoint(prefix, 0)
    for suffix in ("-symbol.json", "-0000.params"):
        os.unlink(prefix + suffix)
    return sym, arg, aux, x[:16], x[16:32], batch


def bound(qsym, qarg, qaux, held, batch):
    """An executor of the INT8 network on a batch of ``batch`` held-out films, warmed up (oneDNN
    creates its primitives on the first runs)."""
    import mxnet as mx
    exe = qsym.bind(mx.cpu(), {**qarg, "data": mx.nd.array(held[np.arange(batch) % len(held)])},
                    aux_states=qaux, grad_req="null")
    for _ in range(3):
        exe.forward(is_train=False)[0].wait_to_read()
    return exe


def alternate(runs, rounds):
    """``{name: [seconds per batch, one per round]}``: the executors ``runs`` timed in one process in
    alternation, two batches each per round, the order reversed every other round, so that a noisy
    host slows them all alike."""
    names, times = list(runs), {k: [] for k in runs}
    for r in range(rounds):
        for key in (names if r % 2 == 0 else names[::-1]):
            tic = time.perf_counter()
            for _ in range(2):
                runs[key].forward(is_train=False)[0].wait_to_read()
            times[key].append((time.perf_counter() - tic) / 2)
    return times


def compare(name, sym, arg, aux, calib, held, batch, rounds):
    import mxnet as mx
    from mxvision.features import int8_graph, quantize
    sym, arg, aux, _ = int8_graph.int8_ready(sym, arg, aux)
    want = quantize.graph_outputs(sym, arg, aux, held)
    runs, row = {}, {"network": name, "batch": batch}
    for unfuse in (False, True):
        tic = time.time()
        qsym, qarg, qaux, record = quantize.calibrate(sym, arg, aux, calib, unfuse=unfuse)
        key = "unfused" if unfuse else "fused"
        row[key] = {"relus_unfused": record["relu_unfused"], "calibration": record["chosen"],
                    "feature_error": round(quantize.feature_error(want, quantize.graph_outputs(qsym, qarg, qaux, held)), 5),
                    "calibration_seconds": round(time.time() - tic, 1)}
        runs[key] = bound(qsym, qarg, qaux, held, batch)
    times = alternate(runs, rounds)
    fused, unfused = np.array(times["fused"]), np.array(times["unfused"])
    row.update(fused_ms=round(1000 * float(np.median(fused)), 1), unfused_ms=round(1000 * float(np.median(unfused)), 1),
               fused_over_unfused_paired=round(float(np.median(fused / unfused)), 3), rounds=rounds)
    log(f"{name} (batch {batch}): {row['unfused']['relus_unfused']} ReLUs unfused; fused {row['fused_ms']} ms, "
        f"unfused {row['unfused_ms']} ms per batch, fused/unfused paired {row['fused_over_unfused_paired']}; "
        f"feature error fused {row['fused']['feature_error']}, unfused {row['unfused']['feature_error']}")
    return row


def work_parser(doc, rounds):
    """The arguments of the benches that time INT8 networks in one process on the files of a
    ``bench_int8_peers.py --work`` folder: ``--work``, ``--rounds``, ``--threads``, ``--out``."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--work", type=Path, required=True,
                   help="a folder bench_int8_peers.py --work wrote (its fp32 trunk and films)")
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    return p


#: What these benches read from a ``bench_int8_peers.py --work`` folder.
WORK_FILES = ("fp32-symbol.json", "fp32-0000.params", "calibration.npy", "held_out.npy")


def checked_work(args, needs=WORK_FILES):
    """Stop with one line on bad arguments or a ``--work`` folder without the peers bench's files
    ``needs``; then fix the threads (before MXNet loads)."""
    if args.rounds < 2 or args.threads < 1:
        sys.exit("--rounds must be >= 2 and --threads >= 1")
    for name in needs:
        if not (args.work / name).is_file():
            sys.exit(f"--work {args.work}: no {name} (run bench/bench_int8_peers.py --work {args.work} first)")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)


def main(argv=None):
    p = work_parser(__doc__, rounds=40)
    p.add_argument("--networks", nargs="*", default=["xvision-trunk", "densenet121", "resnet50-512"],
                   choices=["xvision-trunk", "densenet121", "resnet50-512"])
    args = p.parse_args(argv)
    checked_work(args)
    import mxvision  # noqa: F401  (before MXNet: NumPy compatibility, AMX)
    import mxnet as mx
    from bench_extract import machine_info
    from mxvision.features import quantize
    log(f"unfuse_relu_pays on this CPU: {quantize.unfuse_relu_pays()}")
    load_at_start = os.getloadavg()
    calib_films, held_films = np.load(args.work / "calibration.npy"), np.load(args.work / "held_out.npy")
    rows = []
    for name in args.networks:
        if name == "xvision-trunk":
            sym, arg, aux = mx.model.load_checkpoint(str(args.work / "fp32"), 0)
            rows.append(compare(name, sym, arg, aux, calib_films[:32], held_films, 16, args.rounds))
        else:
            kind, batch = ("densenet121", 8) if name == "densenet121" else ("resnet50", 4)
            rows.append(compare(name, *xrv_port(kind, calib_films, batch), args.rounds))
    out = args.out or BENCH / "results" / time.strftime("int8-unfuse-%Y%m%d-%H%M.json")
    out.write_text(json.dumps({"machine": machine_info(), "load_average_at_start": load_at_start,
                               "load_average_at_end": os.getloadavg(),
                               "unfuse_relu_pays": quantize.unfuse_relu_pays(), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
