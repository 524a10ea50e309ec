"""A lead for issue #16 item 3 (ResNet-50 at 512 px, float32, batch 1): oneDNN's graph fusion of the
ResNet port once its ReLUs are operators the fusion matches. Not what mxvision ships (yet).

    .venv/bin/python bench/bench_xrv_fusion.py [--repeat 9] [--threads 2]

The port calls ``F.relu``; MXNet's oneDNN subgraph pass (``hybridize(backend="MKLDNN")``) fuses a
convolution with its BatchNorm, ReLU and residual sum only when the ReLU is ``Activation(relu)``.
The port's exported float32 graph is taken as it is, with the backend, and with its ``relu`` made
``Activation`` (``mxvision.features.int8_graph.int8_ready``: the same function) and the backend;
all against torchxrayvision's ResNet-50 (torchvision's, 1 input channel, 18 outputs) on PyTorch,
same process, same random 512 px inputs, random weights (speed does not depend on their values).
Prints the outputs' agreement and the median wall time of the best of 3 interleaved rounds.
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import bench_xrv  # noqa: E402  (its torch stack and timing)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import mxvision  # noqa: F401  (first: restores what MXNet reads)
    import mxnet as mx
    torch, _ = bench_xrv.import_torch_stack()
    import torchvision
    from mxvision.features import quantize
    from mxvision.features.int8_graph import int8_ready
    from mxvision.models import zoo

    torch.set_num_threads(args.threads)
    net = zoo.get_model("resnet50-res512-all", weights="none")
    net.init_random(mx.cpu())
    tmp = tempfile.mkdtemp(prefix="bench-xrv-fusion-")
    x = np.random.RandomState(0).uniform(-1024, 1024, (4, 1, 512, 512)).astype(np.float32)
    net.hybridize(static_alloc=True, static_shape=True)
    net(mx.nd.array(x[:1])).wait_to_read()
    net.export(os.path.join(tmp, "port"), 0)
    sym, arg, aux = mx.model.load_checkpoint(os.path.join(tmp, "port"), 0)
    sym_act, arg_act, aux_act, counts = int8_ready(sym, arg, aux)
    print("load average at start: %s; rewritten: %s" % (
        " / ".join("%.2f" % v for v in os.getloadavg()), counts), flush=True)

    def block(s, a, b, backend):
        folder = tempfile.mkdtemp(dir=tmp)
        info = quantize.save(folder, "float32", s, a, b, {})
        blk = quantize.load_block(folder, info, mx.cpu())
        blk.hybridize(static_alloc=True, static_shape=True, **({"backend": backend} if backend else {}))
        return blk

    tm = torchvision.models.resnet50(num_classes=18, weights=None)
    tm.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    tm.eval()
    variants = {"as shipped": block(sym, arg, aux, None),
                "backend MKLDNN, F.relu": block(sym, arg, aux, "MKLDNN"),
                "backend MKLDNN, Activation(relu)": block(sym_act, arg_act, aux_act, "MKLDNN")}
    ref = variants["as shipped"](mx.nd.array(x[:2])).asnumpy()
    for name, blk in variants.items():
        diff = np.abs(blk(mx.nd.array(x[:2])).asnumpy() - ref).max() / np.abs(ref).max()
        print("%s: logits max rel diff to the port as shipped %.1e" % (name, diff))
    print("| batch | torchxrayvision ms | " + " | ".join("%s ms (ratio)" % k for k in variants) + " |")
    for batch in (1, 4):
        xm, xt = mx.nd.array(x[:batch]), torch.from_numpy(x[:batch])

        def run_torch():
            with torch.no_grad():
                return tm(xt).numpy()
        runs = {"torch": run_torch}
        runs.update({k: (lambda b=b: b(xm).asnumpy()) for k, b in variants.items()})
        times = {k: [] for k in runs}
        for _ in range(3):
            for k, fn in runs.items():
                times[k].append(bench_xrv.time_call(fn, args.repeat if batch == 1 else max(3, args.repeat // 2))[0])
        best = {k: min(v) for k, v in times.items()}
        print("| %d | %.1f | " % (batch, best["torch"] * 1e3) + " | ".join(
            "%.1f (%.2f)" % (best[k] * 1e3, best["torch"] / best[k]) for k in variants) + " |", flush=True)
    print("load average at the end: %s" % " / ".join("%.2f" % v for v in os.getloadavg()))


if __name__ == "__main__":
    main()
