"""Inference speed of mxvision's torchxrayvision ports against torchxrayvision itself, same process.

    .venv/bin/python bench/bench_xrv.py [--repeat 20] [--batch 1 8] [--threads 2] [--out docs/BENCHMARKS_XRV.md]

Both frameworks get the same random weights (torchxrayvision's own networks, saved by torch and
read by mxvision's restricted reader), the same inputs and the same number of CPU threads; each
case is warmed up, then timed as the median of ``--repeat`` calls (``torch.no_grad`` / MXNet
hybridized as ``classify`` runs the ports: static shapes and oneDNN's graph fusion on a CPU;
``asnumpy`` to wait for MXNet's asynchronous engine). Needs the
parity extras (torch 2.13 CPU, torchxrayvision; install as in tests/parity/test_xrv_parity.py). Timings interleave the
two frameworks so that load from other processes hits both alike.
"""
import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np


def import_torch_stack():
    """torch and torchxrayvision, with torchvision as the parity suite gets it: the real one when it
    imports, else the verified stand-in (tests/parity/torchvision_stand_in.py; CI has no torchvision)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "parity"))
    import torch
    from reference import TORCHVISION  # noqa: F401  (imports torchvision or installs the stand-in)
    import torchxrayvision
    return torch, torchxrayvision


def time_call(fn, repeat):
    """(median wall seconds, median process CPU seconds) per call, after two warm-up calls.

    CPU time is the robust figure on a shared machine: other jobs stretch wall time, not the
    work a call does (with 1 thread; with more, idle OpenMP threads' spinning counts too)."""
    fn()
    fn()  # warm-up: graph building, allocator, oneDNN primitive caches
    wall, cpu = [], []
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=None, help="also write the markdown section here")
    ap.add_argument("--two-op-bn-relu", action="store_true",
                    help="lever off: DenseNet's BatchNorm + ReLU as two operators (as before issue #16)")
    ap.add_argument("--backend", default="auto",
                    help="auto: as classify runs the ports (mxvision.runtime.hybridize_for_inference: oneDNN "
                         "graph fusion on a CPU); none: a plain static graph (the lever off); or a "
                         "hybridize(backend=...) name, e.g. MKLDNN")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import mxvision  # noqa: F401  (first: mxvision.runtime.compat restores what MXNet reads)
    import mxnet as mx
    torch, xrv_torch = import_torch_stack()
    torch.set_num_threads(args.threads)
    from mxvision.models import zoo
    from mxvision.models.xrv.common import WEIGHTS
    from mxvision.runtime import hybridize_for_inference

    load = " / ".join("%.1f" % v for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    tmp = tempfile.mkdtemp(prefix="bench_xrv_")
    torch.manual_seed(0)
    import torchvision
    nets = {}
    dense = xrv_torch.models.DenseNet()
    torch.save(dense, os.path.join(tmp, WEIGHTS["densenet121-res224-all"].file))
    resnet = torchvision.models.resnet50(num_classes=18, weights=None)
    resnet.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    torch.save(resnet.state_dict(), os.path.join(tmp, WEIGHTS["resnet50-res512-all"].file))
    for name in ("densenet121-res224-all", "resnet50-res512-all"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tm = xrv_torch.models.get_model(name, cache_dir=tmp).eval()
        nm = zoo.get_model(name, weights=os.path.join(tmp, WEIGHTS[name].file))
        if args.two_op_bn_relu and hasattr(nm, "fuse_bn_relu"):
            nm.fuse_bn_relu(False)
        if args.backend == "auto":
            hybridize_for_inference(nm, mx.cpu())
        else:
            nm.hybridize(static_alloc=True, static_shape=True,
                         **({"backend": args.backend} if args.backend != "none" else {}))
        nets[name] = (tm, nm, WEIGHTS[name].resolution)

    rows = []
    rng = np.random.default_rng(0)
    for name, (tm, nm, res) in nets.items():
        for batch in args.batch:
            x = rng.uniform(-1024, 1024, (batch, 1, res, res)).astype(np.float32)
            xt, xm = torch.from_numpy(x), mx.nd.array(x)

            def run_torch():
                with torch.no_grad():
                    return tm(xt).numpy()

            def run_mx():
                return nm(xm).asnumpy()

            # correctness check on logits (calibrated outputs of random weights saturate at 0/1)
            thresholds, tm.op_threshs, nm.calibrated = tm.op_threshs, None, False
            t_logits = run_torch()
            diff = float(np.abs(t_logits - run_mx()).max() / np.abs(t_logits).max())
            tm.op_threshs, nm.calibrated = thresholds, True
            t_torch, t_mx = [], []
            for _ in range(3):  # interleave: three rounds of each
                t_torch.append(time_call(run_torch, max(1, args.repeat // 3)))
                t_mx.append(time_call(run_mx, max(1, args.repeat // 3)))
            (tt, ct), (tmx, cmx) = min(t_torch), min(t_mx)
            ct, cmx = min(c for _, c in t_torch), min(c for _, c in t_mx)
            rows.append((name, res, batch, tt * 1000, tmx * 1000, tt / tmx, ct * 1000, cmx * 1000, ct / cmx, diff))
            print("%-24s %4d  batch %d  wall: torchxrayvision %7.1f ms  mxvision %7.1f ms  ratio %.2f  "
                  "cpu: %7.1f ms  %7.1f ms  ratio %.2f  logits max rel diff %.1e" % rows[-1], flush=True)

    lines = [
        "## torchxrayvision models: mxvision (MXNet) vs torchxrayvision (PyTorch), CPU inference",
        "",
        "Command: `.venv/bin/python bench/bench_xrv.py --repeat %d --batch %s --threads %d%s%s`"
        % (args.repeat, " ".join(map(str, args.batch)), args.threads,
           " --two-op-bn-relu" if args.two_op_bn_relu else "",
           " --backend " + args.backend if args.backend != "auto" else ""),
        "",
        "Machine: %s, %d CPU threads given to each framework; MXNet %s (oneDNN), PyTorch %s, torchxrayvision %s, "
        "Python %s. Same random weights and inputs in one process; median per call of the fastest of 3 "
        "interleaved rounds, after warm-up; each call is the full calibrated forward (op_threshs). "
        "Ratios are torchxrayvision / mxvision: > 1 means mxvision is faster. Load average when the run started: %s."
        % (platform.machine(), args.threads, mx.__version__, torch.__version__, xrv_torch.__version__,
           platform.python_version(), load),
        "",
        "| model | input | batch | wall ms torchxrayvision | wall ms mxvision | wall ratio | CPU ms torchxrayvision "
        "| CPU ms mxvision | CPU ratio | logits max rel diff |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, res, batch, tt, tmx, ratio, ct, cmx, cratio, diff in rows:
        lines.append("| %s | %dx%d | %d | %.1f | %.1f | %.2f | %.1f | %.1f | %.2f | %.1e |"
                     % (name, res, res, batch, tt, tmx, ratio, ct, cmx, cratio, diff))
    shutil.rmtree(tmp, ignore_errors=True)
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
