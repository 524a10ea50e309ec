"""End to end, files -> feature shards in INT8: `mxvision extract --dtype int8` against the fastest
peer pipeline a user would write, OpenVINO INT8 with decoding in threads (issue #16, item 5).

    .venv/bin/python bench/bench_e2e_peers.py [--rounds 5] [--wait-quiet 900] [--work DIR]

Both are timed as whole processes, from the exec to the exit (start-up, imports, model loading,
decoding the 154 JSRT films of ../shared, the network, writing the shard), 2 threads each, in
interleaved rounds with the order alternating, each round into a fresh output folder:

* mxvision: ``.venv/bin/mxvision extract --index jsrt.csv --out OUT --weights none --dtype int8
  --quiet``: the Xvision trunk (ResNet-50 v2 cut at ``stage4_unit2_relu1``, RANDOM seeded weights),
  INT8 calibrated by mxvision on its default 64 films. The calibration is done once before the
  rounds (an untimed warm-up run) and then comes from the user cache, as for a user's second run.
* OpenVINO: ``bench/peer_pipeline_openvino.py`` in the peer venv on the same trunk, exported with
  ``mx.onnx`` and quantized by NNCF on the same 64 films (bench_int8_peers.py's files and
  quantizer, done once before the rounds, untimed); OpenCV decodes in 2 threads one batch ahead.

Both write every film's (2048, 7, 7) features once, in float32. The bench checks that the two
pipelines computed the same thing: relative L1 of each one's features against mxvision float32
of the same films (same trunk, same weights). Prints the table and writes the JSON (``--out``).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))
import bench_int8_peers as peers  # noqa: E402  (no MXNet import at module level)


def timed(cmd, env):
    """Wall seconds of a whole process, and its one-line JSON (if it printed one)."""
    tic = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - tic
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        peers.fail(f"`{' '.join(str(c) for c in cmd[:3])} ...` exited {proc.returncode}: {last[:300]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return seconds, (json.loads(lines[-1]) if lines else None)


def _children_cpu():
    t = os.times()
    return t.children_user + t.children_system


def rel_l1(a, b):
    import numpy as np
    return float(np.abs(a - b).sum() / np.abs(b).sum())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--wait-quiet", type=float, default=0)
    p.add_argument("--work", default=None, help="keep the exchanged files here (reused when present)")
    p.add_argument("--peer-venv", default=str(REPO / ".venv-peers"))
    p.add_argument("--requirements", default=str(BENCH / "requirements-peers.txt"))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.rounds < 1 or args.threads < 1 or args.batch < 1:
        peers.fail("--rounds, --threads and --batch must be >= 1")
    out = Path(args.out) if args.out else BENCH / "results" / time.strftime("e2e-peers-%Y%m%d-%H%M.json")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    peers_py = peers.peer_python(args.peer_venv, args.requirements)
    import numpy as np
    import bench_extract
    from mxvision.features.store import FeatureStore
    from mxvision.runtime import shared_dir

    shared = shared_dir()
    if shared is None or not (shared / "data" / "jsrt" / "images").is_dir():
        peers.fail("needs the JSRT images in ../shared/data/jsrt (set MXVISION_SHARED)")
    peers.wait_quiet(args.wait_quiet)
    work_tmp = None if args.work else tempfile.TemporaryDirectory(prefix="bench-e2e-peers-")
    work = Path(args.work or work_tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    files = peers.prepare_files(argparse.Namespace(calibration_images=64, batch=args.batch), work)
    ov_model = work / "ov-int8.xml"
    if not ov_model.is_file():
        peers.log("quantizing with NNCF in the peer venv")
        worker = peers.Worker(peers_py, "peers", work, {"OMP_NUM_THREADS": str(args.threads)})
        info = worker.call(cmd="quantize", tool="nncf", out=str(ov_model))
        worker.close()
        (work / "ov-int8.xml.json").write_text(json.dumps(info))
    mxv = str(Path(sys.executable).parent / "mxvision")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    index = work / "jsrt.csv"
    timed([mxv, "data", "index", "jsrt", "--root", str(shared / "data" / "jsrt"), "--out", str(index)], env)
    runs = work / "runs"
    commands = {
        "mxvision int8": lambda d: [mxv, "extract", "--index", str(index), "--out", str(d), "--weights", "none",
                                    "--dtype", "int8", "--batch-size", str(args.batch), "--quiet"],
        "openvino int8": lambda d: [str(peers_py), str(BENCH / "peer_pipeline_openvino.py"), "--index", str(index),
                                    "--model", str(ov_model), "--out", str(d), "--batch", str(args.batch),
                                    "--threads", str(args.threads)],
    }
    peers.log("warm-up: mxvision float32 (the reference features) and INT8 (calibrates once, then cached)")
    timed([mxv, "extract", "--index", str(index), "--out", str(runs / "fp32"), "--weights", "none", "--quiet"], env)
    timed(commands["mxvision int8"](runs / "warm-int8"), env)
    result = {"date": time.strftime("%Y-%m-%d %H:%M %Z"),
              "command": " ".join([".venv/bin/python", "bench/bench_e2e_peers.py", *sys.argv[1:]]),
              "machine": bench_extract.machine_info(), "threads": args.threads, "batch": args.batch,
              "films": "the 154 JSRT films of ../shared (PNG)", "weights": "RANDOM (seed 0)",
              "calibration_films": files["calibration_films"],
              "loadavg_at_start": [round(a, 2) for a in os.getloadavg()], "rounds": []}
    names = list(commands)
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        row = {"order": order, "seconds": {}, "loadavg_before": [round(a, 2) for a in os.getloadavg()]}
        busy0, own0 = peers.busy_ticks()[0], _children_cpu()
        tic = time.perf_counter()
        for name in order:
            folder = runs / f"{name.split()[0]}-{r}"
            shutil.rmtree(folder, ignore_errors=True)  # a fresh folder: mxvision would resume a finished store
            row["seconds"][name], reported = timed(commands[name](folder), env)
            if reported:
                row.setdefault("peer_report", {})[name] = reported
        elapsed = time.perf_counter() - tic
        busy = (peers.busy_ticks()[0] - busy0) / os.sysconf("SC_CLK_TCK")
        row["other_processes_cores"] = round(max(0.0, busy - (_children_cpu() - own0)) / elapsed, 2)
        row["loadavg_after"] = [round(a, 2) for a in os.getloadavg()]
        result["rounds"].append(row)
        peers.log(f"  round {r + 1}: " + ", ".join(f"{n} {s:.2f} s" for n, s in row["seconds"].items())
                  + f" | load {row['loadavg_before'][0]}->{row['loadavg_after'][0]}, "
                  f"others {row['other_processes_cores']} cores")
    reference, _, ids = FeatureStore(runs / "fp32").load(verify=False)
    mx_int8, _, ids8 = FeatureStore(runs / "mxvision-0").load(verify=False)
    ov_int8 = np.load(runs / "openvino-0" / "features.npy")
    ov_paths = (runs / "openvino-0" / "paths.txt").read_text().split()
    store_paths = [it["path"] for it in FeatureStore(runs / "fp32").items]
    if ids != ids8 or ov_paths != store_paths or ov_int8.shape != reference.shape:
        peers.fail("the pipelines did not write the same films in the same order")
    n = len(ids)
    table = {}
    for name in names:
        secs = [row["seconds"][name] for row in result["rounds"]]
        med = statistics.median(secs)
        table[name] = {"median_seconds": round(med, 2), "min": round(min(secs), 2), "max": round(max(secs), 2),
                       "images_per_s": round(n / med, 1)}
    table["mxvision int8"]["features_vs_mxvision_fp32_rel_l1"] = round(rel_l1(mx_int8, reference), 5)
    table["openvino int8"]["features_vs_mxvision_fp32_rel_l1"] = round(rel_l1(ov_int8, reference), 5)
    paired = [row["seconds"]["openvino int8"] / row["seconds"]["mxvision int8"] for row in result["rounds"]]
    result.update(images=n, engines=table, peer_quantization=json.loads((work / "ov-int8.xml.json").read_text()),
                  mxvision_over_openvino_speed=round(table["openvino int8"]["median_seconds"]
                                                     / table["mxvision int8"]["median_seconds"], 2),
                  paired_ratio_median=round(statistics.median(paired), 2),
                  loadavg_at_end=[round(a, 2) for a in os.getloadavg()])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nfiles -> shards, {n} films, whole processes, median of {args.rounds} interleaved rounds")
    print("| pipeline | seconds (median) | min-max | images/s | feature rel. L1 vs mxvision fp32 |")
    print("|---|---:|---:|---:|---:|")
    for name, t in table.items():
        print(f"| {name} | {t['median_seconds']} | {t['min']}-{t['max']} | {t['images_per_s']} | "
              f"{t['features_vs_mxvision_fp32_rel_l1']} |")
    print(f"mxvision speed / OpenVINO speed: {result['mxvision_over_openvino_speed']} "
          f"(paired median {result['paired_ratio_median']}); wrote {out}")
    if work_tmp:
        work_tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
