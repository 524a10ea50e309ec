"""bfloat16 and INT8 for torchxrayvision's ports: speed against float32 and torchxrayvision, and how
far the calibrated scores move (issue #16, item 3: a reduced-precision option must stay within 0.02).

    .venv/bin/python bench/bench_xrv_reduced.py [--films 27] [--repeat 7] [--threads 2]
                                                [--dtypes bfloat16 int8] [--calibration 32]

Weights: torchxrayvision's own DenseNet-121 and ResNet-50 (512) classes with RANDOM weights made
realistic as in the parity suite (tests/parity/reference.py: BatchNorm statistics from the real
sample films, a head scaled to O(1) logits); no released weights can be downloaded here. Inputs:
the 5 sample films of ../shared/data/samples and the first ``--films`` JSRT films, read and
preprocessed by mxvision (xrv224 / xrv512). bfloat16 is MXNet AMP's ``convert_hybrid_block`` of
the port's graph (oneDNN bf16 kernels; needs AVX512-BF16 or AMX to be fast), followed by the same
float32 op_norm calibration. INT8 is what ``mxvision.features.quantize.convert`` makes of the
port (its graph re-expressed by ``mxvision.features.int8_graph``, then MXNet's oneDNN quantization,
calibrated as ``extract`` does: on half the ``--calibration`` *other* JSRT films, the calibration
chosen by agreement with float32 on the other half), then the same op_norm. Speed: median per call of the fastest of 3 interleaved rounds, after
warm-up, torchxrayvision float32 vs mxvision float32 vs mxvision bfloat16, same process and
threads. Needs the parity extras (torch 2.13 CPU, torchxrayvision), as bench_xrv.py does.
"""
import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import bench_xrv  # noqa: E402  (its torch stack and timing; no MXNet import at module level)

MODELS = {"densenet121-res224-all": (224, (1, 8)), "resnet50-res512-all": (512, (1, 4))}


def realistic_ports(films, calibration):
    """``(files, calib_files, folder)``: the 5 sample films and the first ``films`` JSRT films to
    score, the next ``calibration`` JSRT films to calibrate on, and a new folder holding
    torchxrayvision's DenseNet-121 and ResNet-50 (512) with the parity suite's realistic random
    weights, in the files mxvision's ``weights=`` reads (``WEIGHTS[name].file``)."""
    torch, xrv_torch = bench_xrv.import_torch_stack()  # puts tests/parity on the path
    from reference import DICOM, RASTER, realistic, sample_paths, torchxrayvision_input
    from mxvision.models.xrv.common import WEIGHTS
    from mxvision.runtime import shared_dir

    samples = sample_paths()
    jsrt = sorted((shared_dir() / "data" / "jsrt" / "images").glob("*.png"))
    files = [samples[n] for n in RASTER + DICOM] + [str(p) for p in jsrt[:films]]
    calib_files = [str(p) for p in jsrt[films:films + calibration]]
    aug = lambda x: torch.from_numpy(np.concatenate([x, x[:, :, :, ::-1].copy()]))  # noqa: E731
    tmp = tempfile.mkdtemp(prefix="bench-xrv-reduced-")
    torch.manual_seed(0)
    x224 = np.stack([torchxrayvision_input(samples[n], 224) for n in RASTER + DICOM])
    dense = xrv_torch.models.DenseNet()
    realistic(dense, dense.classifier, aug(x224), 0)
    torch.save(dense, os.path.join(tmp, WEIGHTS["densenet121-res224-all"].file))
    import torchvision
    resnet = torchvision.models.resnet50(num_classes=18, weights=None)
    resnet.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    x512 = np.stack([torchxrayvision_input(samples[n], 512) for n in RASTER])
    realistic(resnet, resnet.fc, aug(x512), 1)
    torch.save(resnet.state_dict(), os.path.join(tmp, WEIGHTS["resnet50-res512-all"].file))
    return files, calib_files, tmp


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--films", type=int, default=27, help="JSRT films besides the 5 samples")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "int8"], choices=["bfloat16", "int8"])
    ap.add_argument("--calibration", type=int, default=32, help="JSRT films to calibrate INT8 on "
                    "(after the --films ones: none of them is scored)")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import mxvision  # noqa: F401  (first: restores what MXNet reads)
    import mxnet as mx
    from mxnet.contrib import amp
    torch, xrv_torch = bench_xrv.import_torch_stack()  # puts tests/parity on the path
    from mxvision.data.xrv_transforms import load_xray, preprocess
    from mxvision.features import quantize
    from mxvision.models import zoo
    from mxvision.models.xrv.common import WEIGHTS

    torch.set_num_threads(args.threads)
    files, calib_files, tmp = realistic_ports(args.films, args.calibration)
    print("load average at start: %s; %d films; weights RANDOM (realistic BatchNorm, seed 0/1)"
          % (" / ".join("%.2f" % v for v in os.getloadavg()), len(files)), flush=True)
    short = {"bfloat16": "bf16", "int8": "int8"}
    print("| model | batch | torchxrayvision fp32 ms | mxvision fp32 ms | "
          + " | ".join("mxvision %s ms" % short[d] for d in args.dtypes) + " | "
          + " | ".join("%s speed-up over fp32 | torchxrayvision fp32 / mxvision %s" % (short[d], short[d])
                       for d in args.dtypes) + " |")
    agreement = []
    for name, (res, batches) in MODELS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tm = xrv_torch.models.get_model(name, cache_dir=tmp).eval()
        net = zoo.get_model(name, weights=os.path.join(tmp, WEIGHTS[name].file))
        net.hybridize(static_alloc=True, static_shape=True)
        X = np.stack([preprocess(load_xray(f), res) for f in files]).astype(np.float32)
        step = max(batches)
        fp = np.concatenate([net(mx.nd.array(X[i:i + step])).asnumpy() for i in range(0, len(X), step)])
        reduced = {}  # dtype: block giving logits
        if "bfloat16" in args.dtypes:
            with warnings.catch_warnings():  # after a forward: AMP converts the traced graph
                warnings.simplefilter("ignore")
                reduced["bfloat16"] = amp.convert_hybrid_block(net, target_dtype="bfloat16", ctx=mx.cpu())
        if "int8" in args.dtypes:
            calib = np.stack([preprocess(load_xray(f), res) for f in calib_files]).astype(np.float32)
            tic = time.perf_counter()
            qsym, qarg, qaux, _ = quantize.convert(net, "int8", mx.cpu(), "xrv%d" % res, calib)
            folder = os.path.join(tmp, name + "-int8")
            info = quantize.save(folder, "int8", qsym, qarg, qaux, {})
            reduced["int8"] = quantize.load_block(folder, info, mx.cpu())
            print("%s: INT8 calibrated on %d other JSRT films in %.0f s" % (
                name, len(calib), time.perf_counter() - tic), flush=True)
            net.hybridize(static_alloc=True, static_shape=True)  # convert exported it: back to fused
        for block in reduced.values():  # as mxvision runs them (extract, predict): static graphs
            block.hybridize(static_alloc=True, static_shape=True)
        for dtype, block in reduced.items():
            low = np.concatenate([net.postprocess(block(mx.nd.array(X[i:i + step]))).asnumpy()
                                  for i in range(0, len(X), step)])
            diff = np.abs(low - fp)[~np.isnan(fp)]
            agreement.append((name, dtype, float(np.nanstd(fp)), float(diff.max()),
                              float(np.percentile(diff, 99)), float(diff.mean()), float(np.mean(diff > 0.02))))
        for batch in batches:
            xm, xt = mx.nd.array(X[:batch]), torch.from_numpy(X[:batch])

            def run_torch():
                with torch.no_grad():
                    return tm(xt).numpy()
            runs = {"torch": run_torch, "float32": lambda: net(xm).asnumpy()}
            for dtype, block in reduced.items():
                runs[dtype] = lambda block=block: net.postprocess(block(xm)).asnumpy()
            best = _interleaved(runs, args.repeat)
            print("| %s | %d | %.1f | %.1f | " % (name, batch, best["torch"] * 1e3, best["float32"] * 1e3)
                  + " | ".join("%.1f" % (best[d] * 1e3) for d in reduced) + " | "
                  + " | ".join("%.2f | %.2f" % (best["float32"] / best[d], best["torch"] / best[d])
                               for d in reduced) + " |", flush=True)
    print("\ncalibrated scores against float32, %d films x 18 outputs (NaN outputs left out):" % len(files))
    print("| model | precision | fp32 score std | max abs diff | p99 | mean | share > 0.02 |")
    for row in agreement:
        print("| %s | %s | %.3f | %.4f | %.4f | %.4f | %.3f |" % row)
    print("load average at the end: %s" % " / ".join("%.2f" % v for v in os.getloadavg()))


def _interleaved(runs, repeat):
    """Fastest median per engine over 3 rounds, the engines taking turns within each round."""
    times = {k: [] for k in runs}
    for _ in range(3):
        for k, fn in runs.items():
            times[k].append(bench_xrv.time_call(fn, repeat)[0])  # wall median after warm-up
    return {k: min(v) for k, v in times.items()}


if __name__ == "__main__":
    main()
