"""Served throughput and latency of an Xvision model on MXNet Model Server, next to offline predict.

    .venv/bin/python bench/bench_serve.py --json /tmp/serve-bench.json            # ~25 min
    .venv/bin/python bench/bench_serve.py --seconds 10 --soak-seconds 0           # a quick look

What runs (everything real, on 127.0.0.1; random backbone weights, as no pretrained ones exist
here -- the speed does not depend on the weights' values):

1. Two runs of the Xvision pipeline on the JSRT films of ``../shared`` (or ``--index``): ResNet-50 v2
   features in float32 and in INT8 (``mxvision extract --dtype int8``), a head trained on each,
   and one model archive per run (``mxvision export --mar``).
2. For each precision: **offline** ``predict(run, films, batch_size=8)`` in this process (decode +
   preprocess + forward, images/s in the steady state: see :func:`offline_rate`), then the server
   started with ``--workers`` workers (default 1; ``OMP_NUM_THREADS`` threads each) **without batching** (``batch_size=1``) and
   **with** (``batch_size=8``, ``max_batch_delay=50`` ms), each hit by 1, 4 and 16 concurrent
   clients for ``--seconds`` each (closed loop: every client posts the next film as soon as it has
   its answer). Reported per setting: requests/s, p50/p95/p99 latency (client side), errors with
   their HTTP status and message, and served / offline rate.
3. **Soak**: 16 clients with batching for ``--soak-seconds``; the resident memory (RSS) of the
   server's whole process group (Java frontend + workers) after the first minute and at the end.
4. **Fault**: 16 clients with batching for ``--fault-seconds`` while the worker is killed with
   SIGKILL 10 s in: how many requests fail (and what they get), how long until requests succeed
   again, and the longest any client waited (MMS restarts the worker itself).

The machine's load average is printed with the figures (other jobs share its 2 cores).
"""
import argparse
import concurrent.futures
import json
import os
import random
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import mxvision  # noqa: E402,F401  (first: the NumPy names MXNet reads; threads)
import numpy as np  # noqa: E402

from mxvision.data.index import read_index, write_index  # noqa: E402
from mxvision.data.jsrt import read_jsrt  # noqa: E402
from mxvision.features.extract import extract_features  # noqa: E402
from mxvision.inference import predict  # noqa: E402
from mxvision.runtime import shared_dir  # noqa: E402
from mxvision.serve import server as mms  # noqa: E402
from mxvision.serve.archive import export_archive  # noqa: E402
from mxvision.train.loop import train_head  # noqa: E402

BATCHING = {"none": (1, 0), "batch 8": (8, 50)}


def group_rss(pid):
    """Resident bytes of ``pid`` and all its descendants (the server's frontend and workers)."""
    import psutil
    total = 0
    for proc in [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True):
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def post(url, body):
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(request, timeout=120) as response:
        response.read()
        return response.status


def load(url, films, clients, seconds):
    """Closed-loop clients for ``seconds``: requests/s, latency percentiles (ms), errors."""
    stop_at = time.monotonic() + seconds
    latencies, errors, lock = [], [], threading.Lock()

    def client(k):
        rng = random.Random(k)
        while time.monotonic() < stop_at:
            body = films[rng.randrange(len(films))]
            tic = time.monotonic()
            try:
                status = post(url, body)
                ok = status == 200
            except urllib.error.HTTPError as err:  # the server's answer: status and its message
                ok, status = False, f"HTTP {err.code}: {err.read()[:120].decode('utf-8', 'replace')}"
            except (OSError, urllib.error.URLError) as err:
                ok, status = False, f"{type(err).__name__}: {err}"
            with lock:
                (latencies if ok else errors).append(time.monotonic() - tic if ok else status)

    tic = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.monotonic() - tic
    lat = np.array(latencies) * 1000
    return {"clients": clients, "seconds": round(wall, 1), "requests": len(latencies),
            "requests_per_s": round(len(latencies) / wall, 2), "errors": len(errors),
            "error_kinds": sorted({str(e) for e in errors}),
            **{f"p{q}_ms": round(float(np.percentile(lat, q)), 1) if len(lat) else None for q in (50, 95, 99)}}


def worker_processes(server_pid):
    """The processes that score: MMS starts a worker per model, which forks the child that
    serves its socket."""
    import psutil
    workers = [p for p in psutil.Process(server_pid).children(recursive=True)
               if "model_service_worker" in " ".join(p.cmdline())]
    pids = {p.pid for p in workers}
    return [p for p in workers if p.ppid() in pids]


def fault(url, server_pid, films, clients=16, seconds=40.0, kill_at=10.0):
    """Closed-loop clients while the worker is killed with SIGKILL ``kill_at`` s in: failed
    requests (and their answers), the longest latency, and how long until requests succeed again."""
    import signal
    events, lock = [], threading.Lock()  # (start, end, ok, status)
    stop_at = time.monotonic() + seconds

    def client(k):
        rng = random.Random(100 + k)
        while time.monotonic() < stop_at:
            tic = time.monotonic()
            try:
                ok, status = post(url, films[rng.randrange(len(films))]) == 200, 200
            except urllib.error.HTTPError as err:
                ok, status = False, f"HTTP {err.code}: {err.read()[:120].decode('utf-8', 'replace')}"
            except (OSError, urllib.error.URLError) as err:
                ok, status = False, f"{type(err).__name__}: {err}"
            with lock:
                events.append((tic, time.monotonic(), ok, status))

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, k) for k in range(clients)]
        time.sleep(kill_at)
        victims = worker_processes(server_pid)
        killed = time.monotonic()
        for victim in victims:
            victim.send_signal(signal.SIGKILL)
        for f in futures:
            f.result()
    failed = [e for e in events if not e[2]]
    recovered = min((e[1] for e in events if e[2] and e[0] > killed), default=None)
    return {"clients": clients, "workers_killed": len(victims), "requests": len(events),
            "failed": len(failed), "failure_kinds": sorted({str(e[3]) for e in failed}),
            "longest_latency_s": round(max(e[1] - e[0] for e in events), 2),
            "first_success_after_kill_s": None if recovered is None else round(recovered - killed, 2),
            "last_failure_after_kill_s": round(max((e[1] for e in failed), default=killed) - killed, 2)}


def offline_rate(run, paths, repeats=2):
    """Steady-state images/s of ``predict`` (decode + preprocess + forward, batches of 8) and its
    fixed cost per call (the network loaded from the run: ~1.5 s here). Timing ``len(paths)``
    and ``5 * len(paths)`` films and dividing the difference leaves out that fixed cost, which a
    running server has paid once at start-up."""
    predict(run, paths[:8], batch_size=8)  # warm-up: files cached, threads started
    best, fixed = 0.0, None
    for _ in range(repeats):
        tic = time.monotonic()
        predict(run, paths, batch_size=8)
        small = time.monotonic() - tic
        tic = time.monotonic()
        predict(run, paths * 5, batch_size=8)
        big = time.monotonic() - tic
        rate = 4 * len(paths) / (big - small)
        if rate > best:
            best, fixed = rate, small - len(paths) / rate
    return round(best, 2), round(fixed, 2)


def build(work, index_csv, dtypes=("float32", "int8")):
    """Float32 and INT8 runs on the index and their archives; {dtype: (run, archive)}."""
    out = {}
    for dtype in dtypes:
        store = extract_features(index_csv, work / f"features-{dtype}", backbone="resnet50_v2",
                                 weights="none", ctx="cpu", dtype=dtype, allow_random=True,
                                 progress=False)
        run = work / f"run-{dtype}"
        train_head(store, run, epochs=3, ctx="cpu", progress=False)
        archive = export_archive(work / f"xv_{dtype.replace('float', 'fp')}.mar", run=run)["archive"]
        out[dtype] = (run, Path(archive))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--index", default=None, help="index CSV of the films (default: JSRT from ../shared)")
    p.add_argument("--seconds", type=float, default=60.0, help="per setting")
    p.add_argument("--soak-seconds", type=float, default=600.0)
    p.add_argument("--fault-seconds", type=float, default=40.0,
                   help="16 clients while the worker is killed (SIGKILL) 10 s in; 0: skip")
    p.add_argument("--films", type=int, default=64, help="distinct films the clients post")
    p.add_argument("--port", type=int, default=24080)
    p.add_argument("--work", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--workers", type=int, default=1, help="worker processes of the model")
    p.add_argument("--dtypes", default="float32,int8", help="precisions to serve, comma-separated")
    p.add_argument("--clients", default="1,4,16", help="concurrent clients per setting, comma-separated")
    args = p.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="mxvision-serve-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    index_csv = args.index
    if index_csv is None:
        shared = shared_dir()
        if shared is None:
            raise SystemExit("no ../shared: pass --index INDEX.csv")
        index_csv = str(work / "jsrt.csv")
        write_index(read_jsrt(shared / "data" / "jsrt"), index_csv)
    paths = [Path(p) for p in read_index(index_csv).paths][: args.films]
    films = [path.read_bytes() for path in paths]
    runs = build(work, index_csv, args.dtypes.split(","))
    clients_list = [int(c) for c in args.clients.split(",")]
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "workers": args.workers, "films": len(films),
              "film_bytes_mean": int(np.mean([len(f) for f in films])), "settings": []}
    for dtype, (run, archive) in runs.items():
        rate, fixed = offline_rate(run, paths)
        result[f"offline_{dtype}_images_per_s"] = rate
        result[f"offline_{dtype}_fixed_cost_s"] = fixed
        print(f"{dtype}: offline predict {rate} images/s (steady state; {fixed} s per call to load "
              f"the network)", flush=True)
        for label, (batch, delay) in BATCHING.items():
            with mms.start([archive], port=args.port, workers=args.workers, batch_size=batch, max_batch_delay=delay,
                           state_dir=work / f"state-{dtype}-{batch}", page=False) as server:
                url = server.inference_url + archive.stem
                load(url, films, 4, min(10.0, args.seconds))  # warm-up
                for clients in clients_list:
                    row = {"dtype": dtype, "batching": label, **load(url, films, clients, args.seconds)}
                    row["served_vs_offline"] = round(row["requests_per_s"] / rate, 3)
                    row["load_average"] = round(os.getloadavg()[0], 2)
                    result["settings"].append(row)
                    print(json.dumps(row), flush=True)
                if args.soak_seconds and dtype == "float32" and batch > 1:
                    load(url, films, 16, 60.0)
                    first = group_rss(server.process.pid)
                    soak = load(url, films, 16, args.soak_seconds)
                    last = group_rss(server.process.pid)
                    result["soak"] = {**soak, "rss_after_first_minute_mb": round(first / 2 ** 20, 1),
                                      "rss_end_mb": round(last / 2 ** 20, 1),
                                      "rss_growth": round(last / first - 1, 4)}
                    print(json.dumps(result["soak"]), flush=True)
                if args.fault_seconds and dtype == "float32" and batch > 1:
                    result["fault"] = fault(url, server.process.pid, films, seconds=args.fault_seconds)
                    print(json.dumps(result["fault"]), flush=True)
    result["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
