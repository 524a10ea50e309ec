"""mxvision INT8 against the quantized peers (issue #16): ONNX Runtime INT8 and OpenVINO INT8.

    .venv/bin/python bench/bench_int8_peers.py                      # the peers table (~5-10 min)
    .venv/bin/python bench/bench_int8_peers.py --levers batch calib tail fusion isa streams
    .venv/bin/python bench/bench_int8_peers.py --wait-quiet 1800    # wait for load < 0.5 first

The network is the Xvision trunk: model-zoo ResNet-50 v2 cut at ``stage4_unit2_relu1``, 224 px,
RANDOM seeded weights (no pretrained weights exist on this machine; speed does not depend on the
weight values, INT8 feature error may).

How the peers get the same graph and the same films, as FILES:

1. In the main venv (this process, MXNet 1.9.1): the trunk is exported with ``mx.onnx``
   (``bench_extract.export_onnx``: weights made graph constants), the 64 JSRT calibration films
   (the seeded sample ``bench_extract`` and ``mxvision extract`` use) and 32 held-out films are
   written preprocessed as ``.npy``, and mxvision's own INT8 is made by
   ``mxvision.features.quantize.prepare`` (oneDNN, on the same 64 films: since conversion version 8
   it calibrates on 32 of them and keeps the calibration -- entropy, naive, 99.99th or 99.999th
   percentile -- that agrees best with float32 on the other 32; the choice is in the JSON's
   ``mxvision_int8_calibration``).
2. The peers' tools need newer onnx/NumPy than ``mx.onnx`` accepts, so they run in their own venv,
   ``.venv-peers``, which this bench builds (or reuses) from ``bench/requirements-peers.txt``; if it
   cannot, the bench stops with one line. There the ONNX file gets a symbolic batch axis, and:
   ONNX Runtime ``quant_pre_process`` + ``quantize_static`` (QDQ, per-channel, QUInt8 activations /
   QInt8 weights, no reduce_range: its docstring's advice for an x86 CPU with VNNI; MinMax, the
   default calibration; on a CPU without VNNI -- AVX2 only -- a second row with ``reduce_range``,
   7-bit weights, which the same docstring advises there against u8 x s8 overflow; ``--ort-reduce-range``
   adds it anywhere), and OpenVINO reads the same ONNX file for fp32 and for
   ``nncf.quantize`` (default preset) on the same 64 films.

Measuring: every engine lives in a worker process (MXNet ones in the main venv, the peers in
``.venv-peers``) with ``--threads`` threads (OMP_NUM_THREADS, ORT intra-op threads, OpenVINO
INFERENCE_NUM_THREADS with one stream); this process only sends "run N batches" and reads the time.
Rounds are interleaved, the engine order rotated each round; each round records the load average
before and after and the CPU the *other* processes of the machine used meanwhile (from
/proc/stat, minus the bench's own processes). Rounds repeat from ``--min-rounds`` until, for every
engine, the medians of the first and the second half of the rounds agree within ``--tolerance``,
or ``--max-rounds``; whether they agreed is printed. Feature agreement: relative L1 (and cosine)
of each engine's features on the 32 held-out films against mxvision float32.

Levers (``--levers``), each its own interleaved run: ``batch`` (8/16/32 for the three INT8
engines), ``calib`` (entropy vs naive calibration, tensor- vs channel-wise weights), ``tail``
(the final BatchNorm+ReLU left fp32 -- ``smart`` -- or quantized too -- ``full``), ``fusion``
(MXNet environment flags: MXNET_SUBGRAPH_BACKEND=MKLDNN, MXNET_ENGINE_TYPE=NaiveEngine),
``preact`` (ResNet v2's pre-activation BatchNorm + ReLU after each residual sum re-expressed as
a depthwise convolution + ReLU, ``mxvision.features.int8_graph``, so it fuses), ``fold`` (mxvision
folds the same BatchNorms away since conversion version 7 -- their scale into the next
convolutions, their shift into the residual stream, ``int8_graph.fold_preact``, a ReLU left --
against the conversion without it), ``isa`` (mxvision's default, which on a CPU with AMX raises oneDNN's ISA cap to AMX --
``mxvision.runtime.use_amx``: oneDNN 2.4 in MXNet 1.9.1 does not use AMX by itself -- against
``MXVISION_AMX=0``, oneDNN's own AVX-512 VNNI kernels), ``unfuse`` (mxvision's conversion with the
other choice of ``quantize.unfuse_relu_pays``: since conversion version 9, on a CPU with AVX-512
VNNI and no AMX the ReLUs are left out of the convolutions that feed a convolution with a residual
sum, so that one gets an s8 input and oneDNN's ``jit_int8`` kernel instead of ``brgconv``;
``int8_graph.unfuse_relu``), ``streams`` (each INT8 engine as above against itself with two
streams of one thread each, the batch split between them: mxvision's network twice in one
process, run side by side by MXNet's engine -- ``MXNET_CPU_WORKER_NTHREADS=2``,
``OMP_NUM_THREADS=1``; OpenVINO's ``THROUGHPUT`` hint with ``NUM_STREAMS=2`` and two infer
requests; two ONNX Runtime sessions of one thread called from two threads). The other levers' variants are made with MXNet's own flow
(``quantize.quantize_with``), whose ReLUs stay fused: where ``unfuse_relu_pays``, they differ from
mxvision INT8 by that too.

``--realistic-batchnorm``: the random trunk's BatchNorms are identities (mean 0, var 1, gamma 1,
beta 0), so nothing is centred; with it, every engine gets a trunk whose BatchNorms have random
affine parameters and the statistics of the calibration films, as a trained network's would.

Prints a table and writes the JSON (``--out``, default ``bench/results/int8-peers-<date>.json``).
"""
import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
PEER_MODULES = ("openvino", "nncf", "onnxruntime", "onnx", "numpy", "sympy")
HELD_OUT = 32
#: mxvision with oneDNN's default ISA cap (AVX-512 VNNI): what it ran before it enabled AMX itself
NO_AMX_ENV = {"MXVISION_AMX": "0"}
NO_AMX_ROW = "mxvision int8, MXVISION_AMX=0 (no AMX: oneDNN's default)"
ORT_REDUCE_RANGE_ROW = "onnxruntime int8, reduce_range"
#: a CPU with one of these multiplies u8 x s8 into 32 bits; without, AVX2's vpmaddubsw can saturate
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni"})
WEIGHTS_PLAIN = "RANDOM (seed 0): no pretrained weights on this machine"
WEIGHTS_REALISTIC = ("RANDOM (seed 0) with realistic BatchNorms: gamma U(0.5, 1.5), beta U(-0.2, 0.2) "
                     "(seed 0), statistics of the 64 calibration films")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def fail(text):
    """One line on stderr and exit 2: the bench cannot go on."""
    print(f"bench_int8_peers: {text}", file=sys.stderr, flush=True)
    raise SystemExit(2)


# --------------------------------------------------------------------------- the peer venv
def wait_quiet(seconds):
    """Wait up to ``seconds`` for a 1-minute load average under 0.5 (0: do not wait)."""
    if not seconds:
        return
    log(f"waiting up to {seconds:.0f} s for a 1-minute load average < 0.5")
    deadline = time.monotonic() + seconds
    while os.getloadavg()[0] >= 0.5 and time.monotonic() < deadline:
        time.sleep(10)


def peer_python(venv, requirements):
    """The peer venv's python, (re)built from ``requirements`` when it is missing or they changed."""
    venv, requirements = Path(venv), Path(requirements)
    if not requirements.is_file():
        fail(f"cannot build the peer venv: no requirements file {requirements}")
    want = hashlib.sha1(requirements.read_bytes()).hexdigest()
    py, stamp = venv / "bin" / "python", venv / "requirements.sha1"
    if py.is_file() and stamp.is_file() and stamp.read_text().strip() == want:
        return py
    log(f"building the peer venv {venv} from {requirements} (pip; a few minutes the first time)")
    logfile = Path(tempfile.gettempdir()) / "bench_int8_peers-venv.log"
    steps = ([] if py.is_file() else [[sys.executable, "-m", "venv", str(venv)]]) + [
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", str(requirements)],
        [str(py), "-c", "import " + ", ".join(PEER_MODULES)]]
    with open(logfile, "w") as out:
        for cmd in steps:
            try:
                rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
            except OSError as err:
                rc, out_err = None, err
            if rc != 0:
                out.flush()
                lines = [ln.strip() for ln in open(logfile, errors="replace") if ln.strip()
                         and not ln.startswith("WARNING: Location")]
                why = (lines[-1] if lines else f"exit {rc}") if rc is not None else str(out_err)
                fail(f"cannot build the peer venv {venv} from {requirements}: "
                     f"`{' '.join(cmd[1:4])} ...` failed: {why[:200]} (log: {logfile})")
    stamp.write_text(want + "\n")
    return py


# --------------------------------------------------------------------------- workers
class Worker:
    """A process holding engines; JSON lines in, JSON lines out (its stdout is kept for replies)."""

    def __init__(self, python, role, work, env, stderr=None):
        self.role, self.env = role, env
        full = dict(os.environ, **env)
        self.proc = subprocess.Popen([str(python), str(Path(__file__).resolve()), "--worker", role,
                                      "--work", str(work)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=stderr, env=full, text=True,
                                     bufsize=1)

    def call(self, **msg):
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            fail(f"the {self.role} worker {self.env or ''} died (exit {self.proc.poll()}) during "
                 f"{msg.get('cmd')} {msg.get('name', '')}")
        reply = json.loads(line)
        if "error" in reply:
            fail(f"{self.role} worker, {msg.get('cmd')} {msg.get('name', '')}: {reply['error']}")
        return reply

    def close(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


def worker_main(role, work):
    """The loop of a worker process: ``role`` is ``mxnet`` (main venv) or ``peers``."""
    reply_to = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the libraries print goes to stderr, never into the replies
    sys.stdout = sys.stderr
    state = {"work": Path(work), "engines": {}, "held": None}
    handlers = {"run": _run, "features": _features, "load": _load, "quantize": _quantize,
                "openvino_profile": _openvino_profile,
                "info": lambda s, m: {"pid": os.getpid()}}
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            reply = handlers[msg["cmd"]](state, msg)
        except Exception as err:  # reported to the orchestrator, which stops with one line
            text = " ".join(f"{type(err).__name__}: {err}".split())
            reply = {"error": text[:400]}
        reply_to.write(json.dumps(reply) + "\n")


def _batch(state, size):
    import numpy as np
    if state["held"] is None:
        state["held"] = np.load(state["work"] / "held_out.npy")
    held = state["held"]
    return np.ascontiguousarray(held[np.arange(size) % len(held)])


def _load(state, msg):
    """Build the engine ``msg['name']`` for batch ``msg['batch']`` from its spec."""
    spec, batch = msg["spec"], msg["batch"]
    kind = spec["kind"]
    if kind.startswith("mxnet"):
        import mxvision  # noqa: F401  (before MXNet: mxvision.runtime.compat, OMP threads, AMX)
        import bench_extract
        import mxnet as mx
        ctx = mx.cpu()
        if kind == "mxnet-store":
            from mxvision.features import quantize
            block = quantize.load_block(Path(spec["folder"]), spec["info"], ctx)
        else:
            import warnings
            from mxnet import gluon
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                block = gluon.SymbolBlock.imports(spec["symbol"], ["data"], spec["params"], ctx=ctx)
        if spec.get("streams", 1) > 1:  # copies of the network run side by side by MXNet's engine
            fn = _mxnet_streams(block, spec["streams"], ctx)
        elif spec.get("backend"):  # Gluon's own subgraph partitioning (hybridize(backend=...))
            block.hybridize(static_alloc=True, static_shape=True, backend=spec["backend"])
            fn = lambda x: block(mx.nd.array(x, ctx=ctx)).asnumpy()  # noqa: E731
        else:
            fn = bench_extract.mxnet_engine(block, ctx)
    elif kind == "ort":
        fn = _ort_engine(spec["model"], batch, spec["threads"], spec.get("streams", 1))
    elif kind == "openvino":
        fn = _openvino_engine(spec["model"], batch, spec["config"], spec.get("streams", 1))
    else:
        raise ValueError(f"unknown engine kind {kind}")
    state["engines"][msg["name"]] = (fn, batch)
    x = _batch(state, batch)
    fn(x)
    fn(x)  # warm-up: graph building, primitive caches
    return {"ok": True, "info": getattr(fn, "info", None)}


def _mxnet_streams(block, n, ctx):
    """``n`` copies of the network sharing its weights, as ``extract_features`` makes them with
    ``MXVISION_STREAMS`` (``extract.stream_copies``), each given its share of the batch; MXNet's
    engine runs them side by side when the worker has as many CPU workers
    (``MXNET_CPU_WORKER_NTHREADS``), each with its share of the OpenMP threads (the lever's
    environment sets both, as ``mxvision.runtime.use_every_core`` does)."""
    import mxnet as mx
    import numpy as np
    from mxvision.features.extract import stream_copies
    block.hybridize(static_alloc=True, static_shape=True)
    blocks = stream_copies(block, n)

    def fn(x):
        outs = [b(mx.nd.array(part, ctx=ctx)) for b, part in zip(blocks, np.array_split(x, len(blocks)))]
        return np.concatenate([o.asnumpy() for o in outs])
    return fn


def _run(state, msg):
    fn, batch = state["engines"][msg["name"]]
    x = _batch(state, batch)
    tic = time.perf_counter()
    for _ in range(msg["iters"]):
        fn(x)
    return {"seconds": time.perf_counter() - tic}


def _features(state, msg):
    """The engine's features of the held-out films (batches padded to its batch size) to a .npy."""
    import numpy as np
    fn, batch = state["engines"][msg["name"]]
    _batch(state, 1)
    held = state["held"]
    rows = []
    for start in range(0, len(held), batch):
        x = held[np.arange(start, start + batch) % len(held)]
        rows.append(np.asarray(fn(np.ascontiguousarray(x)))[:len(held) - start])
    out = np.concatenate(rows)[:len(held)].astype(np.float32)
    np.save(msg["out"], out)
    return {"shape": list(out.shape)}


def _static_onnx(path, batch):
    """The ONNX model's bytes with the batch axis of its input and output fixed to ``batch``."""
    import onnx
    model = onnx.load(str(path))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = batch
    return model.SerializeToString()


def _ort_engine(path, batch, threads, streams=1):
    """An ONNX Runtime session as bench_extract.ort_engine makes it (that module needs MXNet,
    which this venv lacks), on a static batch; with ``streams`` > 1, that many sessions of
    ``threads // streams`` threads, each given its share of the batch from its own thread (ONNX
    Runtime releases the GIL while it runs)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, threads // streams)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if streams > 1:
        import numpy as np
        from concurrent.futures import ThreadPoolExecutor
        sessions = [ort.InferenceSession(_static_onnx(path, batch // streams), so,
                                         providers=["CPUExecutionProvider"]) for _ in range(streams)]
        pool = ThreadPoolExecutor(streams)
        name = sessions[0].get_inputs()[0].name

        def fn(x):
            parts = np.array_split(x, streams)
            return np.concatenate(list(pool.map(lambda s, p: s.run(None, {name: p})[0], sessions, parts)))
    else:
        sess = ort.InferenceSession(_static_onnx(path, batch), so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name

        def fn(x):
            return sess.run(None, {name: x})[0]
    fn.info = {"onnxruntime": ort.__version__, "sessions": streams}
    return fn


def _openvino_engine(path, batch, config, streams=1):
    """An OpenVINO compiled model on a static batch; with ``streams`` > 1 (and a config that asks
    for as many streams), that many infer requests, each given its share of the batch, run at once."""
    import numpy as np
    import openvino as ov
    core = ov.Core()
    model = core.read_model(str(path))
    model.reshape([batch // streams, 3, 224, 224])
    compiled = core.compile_model(model, "CPU", config)
    requests = [compiled.create_infer_request() for _ in range(streams)]

    def fn(x):
        if streams == 1:
            requests[0].infer({0: x})
        else:
            for request, part in zip(requests, np.array_split(x, streams)):
                request.start_async({0: part})
            for request in requests:
                request.wait()
        # copies: a request reuses its buffer
        return np.concatenate([r.get_output_tensor(0).data.copy() for r in requests])
    fn.info = {"openvino": ov.get_version(),
               **{k: str(compiled.get_property(k)) for k in
                  ("INFERENCE_PRECISION_HINT", "INFERENCE_NUM_THREADS", "NUM_STREAMS", "PERFORMANCE_HINT")}}
    return fn


def _openvino_profile(state, msg):
    """OpenVINO's own per-node timing (``PERF_COUNT``) of ``msg['batches']`` batches, summed by node
    type and kernel: the counterpart of ``onednn_profile`` (runs in .venv-peers)."""
    import openvino as ov
    core = ov.Core()
    model = core.read_model(msg["model"])
    model.reshape([msg["batch"], 3, 224, 224])
    request = core.compile_model(model, "CPU", dict(msg["config"], PERF_COUNT=True)).create_infer_request()
    x = _batch(state, msg["batch"])
    for _ in range(2):
        request.infer({0: x})
    times, nodes, wall = {}, {}, 0.0
    for _ in range(msg["batches"]):
        tic = time.perf_counter()
        request.infer({0: x})
        wall += time.perf_counter() - tic
        for p in request.get_profiling_info():
            if p.status == p.Status.EXECUTED:
                key = f"{p.node_type} {p.exec_type}"
                times[key] = times.get(key, 0.0) + p.real_time.total_seconds() * 1000
                nodes[key] = nodes.get(key, 0) + 1
    return {"rows": top_times(times, msg["batches"], nodes), "totals": profile_totals(times, wall, msg["batches"])}


def _quantize(state, msg):
    """The peers' quantizers, on the exchanged files (runs in .venv-peers)."""
    import numpy as np
    work = state["work"]
    calib = np.load(work / "calibration.npy")
    src = work / "fp32-dyn.onnx"
    if not src.is_file():
        import onnx
        model = onnx.load(str(work / "fp32-const.onnx"))
        for value in (*model.graph.input, *model.graph.output):
            value.type.tensor_type.shape.dim[0].dim_param = "N"
        del model.graph.value_info[:]
        onnx.save(model, str(src))
    tic = time.perf_counter()
    if msg["tool"] == "onnxruntime":
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                              QuantType, quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process
        pre = work / "fp32-pre.onnx"
        quant_pre_process(str(src), str(pre))

        class Films(CalibrationDataReader):
            def __init__(self):
                self.items = iter(calib[k:k + 1] for k in range(len(calib)))

            def get_next(self):
                x = next(self.items, None)
                return None if x is None else {"data": x}
        quantize_static(str(pre), msg["out"], Films(), quant_format=QuantFormat.QDQ,
                        per_channel=msg.get("per_channel", True), reduce_range=msg.get("reduce_range", False),
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        import onnxruntime
        info = {"tool": f"onnxruntime {onnxruntime.__version__} quant_pre_process + quantize_static",
                "quant_format": "QDQ", "per_channel": msg.get("per_channel", True),
                "activation_type": "QUInt8", "weight_type": "QInt8",
                "reduce_range": msg.get("reduce_range", False),
                "calibrate_method": "MinMax"}
    else:
        import nncf
        import openvino as ov
        model = ov.Core().read_model(str(src))
        data = nncf.Dataset([calib[k:k + 1] for k in range(len(calib))])
        quantized = nncf.quantize(model, data, subset_size=len(calib))
        ov.save_model(quantized, msg["out"], compress_to_fp16=False)
        info = {"tool": f"nncf {nncf.__version__} quantize (default preset, subset_size "
                        f"{len(calib)}), openvino {ov.get_version()}"}
    info.update(seconds=round(time.perf_counter() - tic, 1), calibration_films=len(calib))
    return info


# --------------------------------------------------------------------------- load of the machine
def busy_ticks():
    """(busy, steal) clock ticks of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(a) for a in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return user + nice + system + irq + softirq + steal, steal


def own_ticks(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


# --------------------------------------------------------------------------- interleaved rounds
def halves_agree(rates, tolerance):
    """Do the medians of the first and the second half of the rounds agree within ±tolerance, for
    every engine? Returns (agreed, {engine: second-half median / first-half median})."""
    out = {}
    for name, v in rates.items():
        h = len(v) // 2
        a, b = statistics.median(v[:h]), statistics.median(v[len(v) - h:])
        out[name] = round(b / a, 3)
    return all(abs(r - 1) <= tolerance for r in out.values()), out


def interleaved(engines, workers, args, reference="mxvision int8"):
    """Median images/s per engine over interleaved rounds (order rotated), with the load."""
    names = list(engines)
    pids = [os.getpid()] + [w.proc.pid for w in workers]
    tck = os.sysconf("SC_CLK_TCK")
    rates = {k: [] for k in names}
    rounds = []
    agreed, drift = False, {}
    for r in range(args.max_rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        load_before = os.getloadavg()
        (busy0, steal0), own0, t0 = busy_ticks(), own_ticks(pids), time.monotonic()
        for name in order:
            worker, batch = engines[name]
            iters = max(1, round(args.images / batch))
            seconds = worker.call(cmd="run", name=name, iters=iters)["seconds"]
            rates[name].append(iters * batch / seconds)
        (busy1, steal1), own1, wall = busy_ticks(), own_ticks(pids), time.monotonic() - t0
        row = {"order": order, "images_per_s": {k: round(rates[k][-1], 2) for k in names},
               "loadavg_before": [round(a, 2) for a in load_before],
               "loadavg_after": [round(a, 2) for a in os.getloadavg()],
               "seconds": round(wall, 1),
               "other_processes_cores": round(max(0, (busy1 - busy0) - (own1 - own0)) / tck / wall, 2),
               "steal_cores": round((steal1 - steal0) / tck / wall, 2)}
        rounds.append(row)
        log(f"  round {r + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in row["images_per_s"].items())
            + f" | load {row['loadavg_before'][0]}->{row['loadavg_after'][0]}, others "
              f"{row['other_processes_cores']} cores")
        if r + 1 >= args.min_rounds:
            agreed, drift = halves_agree(rates, args.tolerance)
            if agreed:
                break
    summary = {}
    ref = statistics.median(rates[reference]) if reference in rates else None
    for k, v in rates.items():
        med = statistics.median(v)
        summary[k] = {"median": round(med, 2), "min": round(min(v), 2), "max": round(max(v), 2),
                      "batch": engines[k][1]}
        if ref is not None:
            summary[k]["reference_over_engine"] = round(ref / med, 2)
            summary[k]["reference_over_engine_paired"] = round(statistics.median(
                a / b for a, b in zip(rates[reference], v)), 2)
    return {"engines": summary, "rounds": rounds, "n_rounds": len(rounds),
            "agreed_within_tolerance": agreed, "tolerance": args.tolerance,
            "half_median_ratio": drift, "reference": reference,
            "loadavg_1min_range": [min(r["loadavg_before"][0] for r in rounds),
                                   max(r["loadavg_after"][0] for r in rounds)],
            "other_processes_cores_median": round(statistics.median(r["other_processes_cores"]
                                                                    for r in rounds), 2)}


# --------------------------------------------------------------------------- orchestration
def mx_int8_variant(work, name, calib, calib_mode="entropy", quantize_mode="smart",
                    granularity="tensor-wise", bn_after=None, fold=True, unfuse=None):
    """mxvision's INT8 conversion with one knob changed (the levers), written as symbol/params
    (named with ``quantize.CONVERSION_VERSION``, so a ``--work`` folder of older code is not reused).

    The graph is re-expressed as ``quantize.convert`` does (``int8_graph.int8_ready``), with
    ``bn_after``: the BatchNorms after these operators become depthwise convolutions too, but the
    last one, which stays float32 as ``smart`` keeps it; ``fold=False``: the pre-activation
    BatchNorms are not folded away (mxvision before conversion version 7); ``unfuse`` True or False:
    mxvision's own calibration (``quantize.calibrate``, chosen by agreement) with the ReLUs left out
    of the convolutions or not, instead of ``calib_mode``."""
    import mxnet as mx
    from mxvision.features.int8_graph import BN_AFTER, int8_ready
    from mxvision.features.quantize import CONVERSION_VERSION, calibrate, describe_calibration, quantize_with
    name = f"{name}-v{CONVERSION_VERSION}"
    sym_file, params_file = work / f"{name}-symbol.json", work / f"{name}.params"
    if not sym_file.is_file():
        sym, arg, aux = mx.model.load_checkpoint(str(work / "fp32"), 0)
        excluded = None
        sym, arg, aux, counts = int8_ready(sym, arg, aux, bn_after=bn_after or BN_AFTER, fold=fold)
        if bn_after:
            tail = [n["name"] for n in json.loads(sym.tojson())["nodes"] if n["op"] == "Convolution"][-1]
            excluded = [tail] if tail.endswith("_conv") else None
        log(f"{name}: {counts}; left float32: {excluded}")
        if unfuse is not None:
            if (calib_mode, quantize_mode, granularity, bn_after) != ("entropy", "smart", "tensor-wise", None):
                raise ValueError("unfuse makes mxvision's own conversion: no other knob applies")
            qsym, qarg, qaux, record = calibrate(sym, arg, aux, calib, unfuse=unfuse)
            log(f"{name}: {describe_calibration(record)}")
        else:
            qsym, qarg, qaux, _ = quantize_with(sym, arg, aux, calib, calib_mode=calib_mode, quantize_mode=quantize_mode,
                                                quantize_granularity=granularity, excluded_sym_names=excluded)
        qsym.save(str(sym_file))
        mx.nd.save(str(params_file), {**{f"arg:{k}": v for k, v in qarg.items()},
                                      **{f"aux:{k}": v for k, v in qaux.items()}})
    return {"kind": "mxnet-symbol", "symbol": str(sym_file), "params": str(params_file)}


def realistic_batchnorm(net, images, seed=0):
    """Give every BatchNorm of the float32 ``net`` random affine parameters (gamma U(0.5, 1.5), beta
    U(-0.2, 0.2), as the parity suite's ``realistic_batchnorm``) and the statistics of its own input
    over ``images`` (real films), layer by layer in one pass: a trained network's BatchNorms
    centre and scale each channel, where the random trunk's are identities (mean 0, var 1)."""
    import numpy as np
    import mxnet as mx
    from mxnet.gluon import nn
    rs = np.random.RandomState(seed)
    layers = []
    net.apply(lambda block: layers.append(block) if isinstance(block, nn.BatchNorm) else None)

    def set_statistics(block, inputs):  # before the layer runs, so the layers after see its output
        x = inputs[0].asnumpy().astype(np.float64)
        channels = x.shape[1]
        block.gamma.set_data(mx.nd.array(rs.uniform(0.5, 1.5, channels)))
        block.beta.set_data(mx.nd.array(rs.uniform(-0.2, 0.2, channels)))
        block.running_mean.set_data(mx.nd.array(x.mean(axis=(0, 2, 3))))
        block.running_var.set_data(mx.nd.array(x.var(axis=(0, 2, 3))))
    hooks = [layer.register_forward_pre_hook(set_statistics) for layer in layers]
    net.hybridize(active=False)  # hooks run only in imperative calls
    net(mx.nd.array(images)).wait_to_read()
    for hook in hooks:
        hook.detach()
    net.hybridize()
    log(f"realistic BatchNorm statistics for {len(layers)} layers from {len(images)} films")


def weights_description(args):
    """What the trunk's weights are, for the result and the ``--work`` folder's marker."""
    return WEIGHTS_REALISTIC if args.realistic_batchnorm else WEIGHTS_PLAIN


def params_digest(net):
    """sha1 of a network's parameters, names and values."""
    digest = hashlib.sha1()
    for name, param in sorted(net.collect_params().items()):
        digest.update(name.encode())
        digest.update(param.data().asnumpy().tobytes())
    return digest.hexdigest()


def prepare_files(args, work):
    """Everything the engines need, as files in ``work`` (kept and reused with ``--work``)."""
    import numpy as np
    import mxnet as mx
    import bench_extract
    from mxvision.data import transforms
    from mxvision.features import quantize
    from mxvision.models import zoo
    from mxvision.runtime import shared_dir

    shared = shared_dir()
    if shared is None or not (shared / "data" / "jsrt" / "images").is_dir():
        fail("needs the JSRT images in ../shared/data/jsrt (set MXVISION_SHARED)")
    preset = transforms.get_preset("imagenet224")
    paths = sorted(str(q) for q in (shared / "data" / "jsrt" / "images").glob("*.png"))
    pick = set(np.random.RandomState(0).permutation(len(paths))[:args.calibration_images].tolist())
    calib_paths = [paths[k] for k in sorted(pick)]  # the sample bench_extract calibrates on
    held_paths = [p for k, p in enumerate(paths) if k not in pick][:HELD_OUT]
    calib = np.stack([transforms.load_image(q, preset) for q in calib_paths])
    same = quantize.load_calibration(calib_paths, preset)  # what mxvision's own INT8 calibrates on
    if not np.array_equal(same, calib):
        fail("the calibration films preprocess differently for mxvision and for the peers")
    np.save(work / "calibration.npy", calib)
    np.save(work / "held_out.npy", np.stack([transforms.load_image(q, preset) for q in held_paths]))
    ctx = mx.cpu()
    net, winfo = zoo.build_backbone(weights="none", ctx=ctx)
    weights = weights_description(args)
    if args.realistic_batchnorm:
        realistic_batchnorm(net, calib)
        # random weights are keyed by their seed alone (sha1 None): these are other weights, and
        # mxvision's INT8 cache must not hand one kind's conversion to the other
        winfo = dict(winfo, sha1=params_digest(net), description=weights)
    marker = work / "weights.txt"  # a --work folder holds the files of one kind of weights
    if marker.is_file() and marker.read_text() != weights:
        fail(f"--work {work}: holds the files of other weights ({marker.read_text()}); use another folder")
    marker.write_text(weights)
    if not (work / "fp32-const.onnx").is_file():
        log("exporting the trunk with mx.onnx")
        bench_extract.export_onnx(net, args.batch, work)
    features_info = {"backbone": zoo.DEFAULT_BACKBONE, "cut": zoo.DEFAULT_CUT, "weights": winfo,
                     "preprocessing": preset.to_dict()}
    log("mxvision INT8 (quantize.prepare: calibrated on 32 of the 64 films, chosen on the other 32)")
    tic = time.perf_counter()
    _, int8_info = quantize.prepare(net, "int8", ctx, preset, features_info, work / "mx-int8",
                                    calibration=calib_paths)
    log(f"mxvision INT8: {quantize.describe_calibration(int8_info['calibration'])}")
    return {"calib": calib, "int8_info": int8_info, "int8_seconds": round(time.perf_counter() - tic, 1),
            "calibration_films": [Path(p).name for p in calib_paths],
            "held_out_films": [Path(p).name for p in held_paths]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="threads of every engine")
    p.add_argument("--images", type=int, default=64, help="images per engine per round")
    p.add_argument("--min-rounds", type=int, default=6)
    p.add_argument("--max-rounds", type=int, default=16)
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--calibration-images", type=int, default=64)
    p.add_argument("--levers", nargs="*", default=[],
                   choices=["batch", "calib", "tail", "preact", "fold", "fusion", "isa", "unfuse", "streams"])
    p.add_argument("--skip-peers", action="store_true", help="only the levers")
    p.add_argument("--onednn-profile", action="store_true",
                   help="also sum oneDNN's verbose timing of mxvision INT8 by primitive (with and without "
                        "AMX, and the INT8 networks of the preact and fold levers)")
    p.add_argument("--vnni-row", action="store_true",
                   help="add mxvision INT8 with MXVISION_AMX=0 (the isa lever: no AMX) to the peers table")
    p.add_argument("--ort-reduce-range", action="store_true",
                   help="add ONNX Runtime INT8 with reduce_range (7-bit weights) to the peers table; "
                        "on by default on a CPU without VNNI, where ONNX Runtime advises it")
    p.add_argument("--realistic-batchnorm", action="store_true",
                   help="give the trunk's BatchNorms random affine parameters and the statistics of the "
                        "calibration films (the random trunk's are identities); every engine gets them")
    p.add_argument("--wait-quiet", type=float, default=0,
                   help="first wait up to this many seconds for a 1-minute load average < 0.5")
    p.add_argument("--peer-venv", default=str(REPO / ".venv-peers"))
    p.add_argument("--requirements", default=str(BENCH / "requirements-peers.txt"))
    p.add_argument("--work", default=None, help="keep the exchanged files here (reused when present)")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        sys.path.insert(0, str(BENCH))
        sys.path.insert(0, str(REPO))
        return worker_main(args.worker, args.work)
    if args.batch < 1 or args.threads < 1 or args.min_rounds < 2 or args.max_rounds < args.min_rounds:
        fail("--batch and --threads must be >= 1, 2 <= --min-rounds <= --max-rounds")
    out = Path(args.out) if args.out else BENCH / "results" / time.strftime("int8-peers-%Y%m%d-%H%M.json")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        fail(f"--out {out}: cannot create its folder ({err.strerror})")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before MXNet loads, here and in the workers
    peers_py = peer_python(args.peer_venv, args.requirements) if not args.skip_peers or \
        set(args.levers) & {"batch", "streams"} else None
    sys.path.insert(0, str(BENCH))
    sys.path.insert(0, str(REPO))
    import bench_extract  # noqa: E402  (imports mxvision and MXNet)

    wait_quiet(args.wait_quiet)
    work_tmp = None
    if args.work:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
    else:
        work_tmp = tempfile.TemporaryDirectory(prefix="bench-int8-peers-")
        work = Path(work_tmp.name)
    result = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "command": " ".join(
        [".venv/bin/python", "bench/bench_int8_peers.py", *sys.argv[1:]]),
        "machine": bench_extract.machine_info(), "threads": args.threads, "batch": args.batch,
        "network": "model-zoo resnet50_v2 cut at stage4_unit2_relu1 (Xvision trunk), 224 px",
        "weights": weights_description(args),
        "loadavg_at_start": [round(a, 2) for a in os.getloadavg()]}
    workers = {}

    def worker(role, env=None):
        key = (role, tuple(sorted((env or {}).items())))
        if key not in workers:
            py = sys.executable if role == "mxnet" else peers_py
            workers[key] = Worker(py, role, work, {"OMP_NUM_THREADS": str(args.threads), **(env or {})})
        return workers[key]

    try:
        files = prepare_files(args, work)
        result.update(mxvision_int8_calibration_seconds=files["int8_seconds"],
                      mxvision_int8_calibration={k: v for k, v in files["int8_info"]["calibration"].items()
                                                 if k != "paths"},
                      calibration_films=files["calibration_films"], held_out_films=files["held_out_films"])
        fp32_spec = {"kind": "mxnet-symbol", "symbol": str(work / "fp32-symbol.json"),
                     "params": str(work / "fp32-0000.params")}
        int8_spec = {"kind": "mxnet-store", "folder": str(work / "mx-int8"), "info": files["int8_info"]}
        ov_threads = {"INFERENCE_NUM_THREADS": args.threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
        from mxvision.runtime import cpu_flags
        flags = cpu_flags()
        # ONNX Runtime's advice for an x86 CPU without VNNI; off Linux the flags are unknown (empty)
        reduce_range_row = not args.skip_peers and (
            args.ort_reduce_range or ("avx2" in flags and not flags & VNNI_FLAGS))
        if peers_py is not None:
            # (key in the result's peer_quantization, tool, file, the tool's options)
            quantizations = [("onnxruntime", "onnxruntime", "ort-int8.onnx", {}),
                             ("nncf", "nncf", "ov-int8.xml", {})]
            if reduce_range_row:
                quantizations.append(("onnxruntime, reduce_range", "onnxruntime", "ort-int8-rr.onnx",
                                      {"reduce_range": True}))
            for key, tool, name, options in quantizations:
                if not (work / name).is_file():
                    log(f"quantizing with {key} in the peer venv")
                    info = worker("peers").call(cmd="quantize", tool=tool, out=str(work / name), **options)
                    (work / f"{name}.json").write_text(json.dumps(info))
                result.setdefault("peer_quantization", {})[key] = json.loads((work / f"{name}.json").read_text())
        specs = {
            "mxvision fp32": ("mxnet", fp32_spec),
            "mxvision int8": ("mxnet", int8_spec),
            "onnxruntime fp32": ("peers", {"kind": "ort", "model": str(work / "fp32-dyn.onnx"),
                                           "threads": args.threads}),
            "onnxruntime int8": ("peers", {"kind": "ort", "model": str(work / "ort-int8.onnx"),
                                           "threads": args.threads}),
            "openvino fp32": ("peers", {"kind": "openvino", "model": str(work / "fp32-dyn.onnx"),
                                        "config": dict(ov_threads, INFERENCE_PRECISION_HINT="f32")}),
            "openvino int8": ("peers", {"kind": "openvino", "model": str(work / "ov-int8.xml"),
                                        "config": ov_threads}),
        }
        if reduce_range_row:
            specs[ORT_REDUCE_RANGE_ROW] = ("peers", {"kind": "ort", "model": str(work / "ort-int8-rr.onnx"),
                                                     "threads": args.threads})
        runs = []
        if not args.skip_peers:
            peers = {k: (specs[k], args.batch, None) for k in specs}
            if args.vnni_row:  # the isa lever beside the peers: mxvision INT8 without AMX
                peers[NO_AMX_ROW] = (specs["mxvision int8"], args.batch, NO_AMX_ENV)
            runs.append(("peers", peers))
        for lever in args.levers:
            runs.append((lever, lever_engines(lever, specs, files, work, args)))
        for run_name, engine_specs in runs:
            log(f"== {run_name}: loading {len(engine_specs)} engines")
            engines, infos = {}, {}
            for name, ((role, spec), batch, env) in engine_specs.items():
                w = worker(role, env)
                infos[name] = w.call(cmd="load", name=name, spec=spec, batch=batch).get("info")
                engines[name] = (w, batch)
            log(f"== {run_name}: feature agreement on {HELD_OUT} held-out films")
            feats = {}
            for name, (w, _) in engines.items():
                w.call(cmd="features", name=name, out=str(work / "features.npy"))
                feats[name] = __import__("numpy").load(work / "features.npy")
            ref_name = next((k for k in feats if "fp32" in k), None)
            ref = feats[ref_name] if ref_name else None
            if ref is None:  # the levers without an fp32 engine: against mxvision fp32
                w = worker("mxnet")
                w.call(cmd="load", name="mxvision fp32", spec=fp32_spec, batch=args.batch)
                w.call(cmd="features", name="mxvision fp32", out=str(work / "features.npy"))
                ref_name, ref = "mxvision fp32", __import__("numpy").load(work / "features.npy")
            log(f"== {run_name}: interleaved rounds (images/s)")
            reference = next(k for k in engines if k.startswith("mxvision int8"))
            section = interleaved(engines, list({id(w): w for w, _ in engines.values()}.values()),
                                  args, reference)
            if NO_AMX_ROW in section["engines"]:
                med = {k: v["median"] for k, v in section["engines"].items()}
                section["ratios_without_amx"] = {f"{NO_AMX_ROW} / {k}": round(med[NO_AMX_ROW] / med[k], 2)
                                                 for k in med if k != NO_AMX_ROW}
            if run_name == "streams":  # each engine with two streams against the others with two
                mine, rounds = "mxvision int8, 2 streams", section["rounds"]
                section["ratios_with_streams"] = {
                    f"{mine} / {peer}": {
                        "medians": round(section["engines"][mine]["median"] / row["median"], 2),
                        "paired": round(statistics.median(r["images_per_s"][mine] / r["images_per_s"][peer]
                                                          for r in rounds), 2)}
                    for peer, row in section["engines"].items() if peer != mine}
                print("\n".join(f"  {k}: {v['medians']} (paired {v['paired']})"
                                 for k, v in section["ratios_with_streams"].items()), flush=True)
            if run_name == "batch":  # mxvision INT8 / peer INT8 at the same batch size
                med = {k: v["median"] for k, v in section["engines"].items()}
                section["ratios_at_same_batch"] = {
                    f"b{n}": {f"mxvision int8 / {peer}": round(med[f"mxvision int8 b{n}"] / med[f"{peer} b{n}"], 2)
                              for peer in ("onnxruntime int8", "openvino int8")} for n in (8, 16, 32)}
            for name, row in section["engines"].items():
                row["features_vs_" + ref_name.replace(" ", "_")] = bench_extract.agreement(feats[name], ref)
                if infos.get(name):
                    row["engine_info"] = infos[name]
                if engine_specs[name][2]:
                    row["environment"] = engine_specs[name][2]
            result[run_name] = section
            print(table(run_name, section), flush=True)
        if args.onednn_profile:
            profiled = {"mxvision int8": (int8_spec, {}), "mxvision int8, MXVISION_AMX=0": (int8_spec, NO_AMX_ENV)}
            for run_name, engine_specs in runs:  # and the graph levers' INT8 networks
                if run_name in ("preact", "fold"):
                    profiled.update({k: (spec, {}) for k, ((_, spec), _, _) in engine_specs.items()
                                     if k != "mxvision int8"})
            result["onednn_profile"] = {label: onednn_profile(spec, args, work, env)
                                        for label, (spec, env) in profiled.items()}
            if peers_py is not None:  # OpenVINO INT8's own timing, by node type
                ov = specs["openvino int8"][1]
                result["openvino_profile"] = {"openvino int8": worker("peers").call(
                    cmd="openvino_profile", model=ov["model"], config=ov["config"], batch=args.batch, batches=4)}
            for label, profile in {**result["onednn_profile"], **result.get("openvino_profile", {})}.items():
                print(f"\ntime by primitive (oneDNN) or node type (OpenVINO), {label} (share of the sum):")
                for key, row in profile["rows"].items():
                    print(f"  {row['share']:6.1%}  {row['ms_per_batch']:8.1f} ms/batch  {key}")
                t = profile["totals"]
                print(f"  all of them {t['all_ms_per_batch']} ms/batch; wall {t['wall_ms_per_batch']} ms/batch "
                      f"(outside them: {t['outside_ms_per_batch']})")
        result["loadavg_at_end"] = [round(a, 2) for a in os.getloadavg()]
    finally:
        for w in workers.values():
            w.close()
        if work_tmp is not None:
            work_tmp.cleanup()
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")


def lever_engines(lever, specs, files, work, args):
    """{engine: ((role, spec), batch, env)} of one lever's interleaved run."""
    b = args.batch
    if lever == "batch":
        return {f"{k} b{n}": (specs[k], n, None) for n in (8, 16, 32)
                for k in ("mxvision int8", "onnxruntime int8", "openvino int8")}
    calib = files["calib"]
    if lever == "calib":
        log("lever calib: converting the variants (entropy/naive, tensor-/channel-wise)")
        return {"mxvision int8": (specs["mxvision int8"], b, None),
                "int8 entropy tensor-wise": (("mxnet", mx_int8_variant(work, "q-entropy", calib)), b, None),
                "int8 naive tensor-wise": (("mxnet", mx_int8_variant(work, "q-naive", calib, "naive")), b, None),
                "int8 entropy channel-wise": (("mxnet", mx_int8_variant(
                    work, "q-entropy-ch", calib, granularity="channel-wise")), b, None)}
    if lever == "tail":
        log("lever tail: converting with quantize_mode=full")
        return {"mxvision int8": (specs["mxvision int8"], b, None),
                "int8 full (tail quantized)": (("mxnet", mx_int8_variant(work, "q-full", calib,
                                                                         quantize_mode="full")), b, None)}
    if lever == "preact":
        log("lever preact: ResNet v2's pre-activation BatchNorms as depthwise convolutions")
        variant = mx_int8_variant(work, "q-preact", calib, bn_after=("Concat", "elemwise_add", "Pooling"))
        return {"mxvision int8": (specs["mxvision int8"], b, None),
                "int8 pre-activation BatchNorm as conv": (("mxnet", variant), b, None)}
    if lever == "fold":
        log("lever fold: ResNet v2's pre-activation BatchNorms not folded away (as before version 7)")
        variant = mx_int8_variant(work, "q-nofold", calib, fold=False)
        return {"mxvision int8": (specs["mxvision int8"], b, None),
                "int8 pre-activation BatchNorm not folded": (("mxnet", variant), b, None)}
    if lever == "fusion":
        return {"mxvision int8": (specs["mxvision int8"], b, None),
                "int8 MXNET_SUBGRAPH_BACKEND=MKLDNN": (specs["mxvision int8"], b,
                                                       {"MXNET_SUBGRAPH_BACKEND": "MKLDNN"}),
                "int8 MXNET_ENGINE_TYPE=NaiveEngine": (specs["mxvision int8"], b,
                                                       {"MXNET_ENGINE_TYPE": "NaiveEngine"}),
                "int8 hybridize(backend=MKLDNN)": (("mxnet", dict(specs["mxvision int8"][1],
                                                                  backend="MKLDNN")), b, None),
                "mxvision fp32": (specs["mxvision fp32"], b, None),
                "fp32 MXNET_SUBGRAPH_BACKEND=MKLDNN": (specs["mxvision fp32"], b,
                                                       {"MXNET_SUBGRAPH_BACKEND": "MKLDNN"}),
                "fp32 hybridize(backend=MKLDNN)": (("mxnet", dict(specs["mxvision fp32"][1],
                                                                  backend="MKLDNN")), b, None)}
    if lever == "unfuse":
        from mxvision.features.quantize import unfuse_relu_pays
        other = not unfuse_relu_pays()
        log(f"lever unfuse: mxvision's conversion with its ReLUs {'unfused' if other else 'fused (as version 8)'}")
        variant = mx_int8_variant(work, "q-unfused" if other else "q-fused", calib, unfuse=other)
        return {"mxvision int8": (specs["mxvision int8"], b, None),
                f"int8 ReLUs {'unfused' if other else 'fused (as version 8)'}": (("mxnet", variant), b, None)}
    if lever == "streams":  # two streams of one thread each, the batch split between them
        n = 2
        if b % n or args.threads % n:
            fail(f"--levers streams: --batch and --threads must be even (two streams), not {b} and {args.threads}")
        one_thread = {"MXVISION_STREAMS": str(n), "OMP_NUM_THREADS": str(max(1, args.threads // n)),
                      "MXNET_CPU_WORKER_NTHREADS": str(n)}
        role, ort_int8 = specs["onnxruntime int8"]
        _, ov_int8 = specs["openvino int8"]
        ov_streams = {"INFERENCE_NUM_THREADS": args.threads, "NUM_STREAMS": n, "PERFORMANCE_HINT": "THROUGHPUT"}
        return {"mxvision int8": (specs["mxvision int8"], b, None),
                f"mxvision int8, {n} streams": (("mxnet", dict(specs["mxvision int8"][1], streams=n)), b,
                                                one_thread),
                "openvino int8": (specs["openvino int8"], b, None),
                f"openvino int8, {n} streams": ((role, dict(ov_int8, config=ov_streams, streams=n)), b, None),
                "onnxruntime int8": (specs["onnxruntime int8"], b, None),
                f"onnxruntime int8, {n} streams": ((role, dict(ort_int8, streams=n)), b, None)}
    if lever == "isa":
        return {"mxvision int8": (specs["mxvision int8"], b, None),
                "int8 MXVISION_AMX=0": (specs["mxvision int8"], b, NO_AMX_ENV),
                "mxvision fp32": (specs["mxvision fp32"], b, None),
                "fp32 MXVISION_AMX=0": (specs["mxvision fp32"], b, NO_AMX_ENV)}
    raise ValueError(lever)


def onednn_profile(spec, args, work, env, batches=4):
    """oneDNN's own timing (DNNL_VERBOSE=1) of ``batches`` batches of an engine, summed by primitive
    and implementation: where the INT8 network spends its time (shares hold under load too).
    ``{"rows": ..., "totals": ...}``: the totals set the primitives' sum beside the batches' wall
    time, whose difference is the time spent outside them (MXNet's dispatch, the copies in and out,
    DNNL_VERBOSE's own logging)."""
    with tempfile.TemporaryFile("w+") as err:
        w = Worker(sys.executable, "mxnet", work, dict(env, DNNL_VERBOSE="1", OMP_NUM_THREADS=str(args.threads)),
                   stderr=err)
        try:
            w.call(cmd="load", name="profiled", spec=spec, batch=args.batch)
            err.flush()
            start = err.tell()
            wall = w.call(cmd="run", name="profiled", iters=batches)["seconds"]
        finally:
            w.close()
        err.seek(start)
        times = {}
        for line in err:
            f = line.rstrip().split(",")
            if len(f) > 5 and f[0] == "dnnl_verbose" and f[1] == "exec":
                key = f"{f[3]} {f[4]}"
                times[key] = times.get(key, 0.0) + float(f[-1])
    return {"rows": top_times(times, batches), "totals": profile_totals(times, wall, batches)}


def profile_totals(times, wall_seconds, batches):
    """ms per batch: all the primitives (or nodes) of a profile, the batches' wall time, and the
    difference: the time outside them."""
    inside, wall = sum(times.values()) / batches, 1000 * wall_seconds / batches
    return {"all_ms_per_batch": round(inside, 1), "wall_ms_per_batch": round(wall, 1),
            "outside_ms_per_batch": round(wall - inside, 1)}


def top_times(times, batches, counts=None):
    """The 10 largest of ``times`` (ms summed over ``batches`` batches, by primitive or node type):
    ms per batch, share of the sum, and with ``counts`` how many ran per batch."""
    total = sum(times.values()) or 1.0
    return {k: {"ms_per_batch": round(v / batches, 1), "share": round(v / total, 3),
                **({"nodes": counts[k] // batches} if counts else {})}
            for k, v in sorted(times.items(), key=lambda kv: -kv[1])[:10]}


def table(run_name, section):
    ref = section["reference"]
    lines = [f"\n{run_name}: median images/s of {section['n_rounds']} interleaved rounds; halves "
             f"{'agreed' if section['agreed_within_tolerance'] else 'did NOT agree'} within "
             f"±{100 * section['tolerance']:.0f}%; 1-min load {section['loadavg_1min_range'][0]}-"
             f"{section['loadavg_1min_range'][1]}, other processes {section['other_processes_cores_median']} cores",
             f"| engine | batch | images/s (median) | min-max | {ref} ÷ engine (paired) | rel. L1 vs fp32 |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, row in section["engines"].items():
        agree = next(v for k, v in row.items() if k.startswith("features_vs_"))
        lines.append(f"| {name} | {row['batch']} | {row['median']} | {row['min']}-{row['max']} | "
                     f"{row['reference_over_engine']} ({row['reference_over_engine_paired']}) | {agree['rel_l1']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
