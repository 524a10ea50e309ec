"""End to end, files -> feature shards in INT8: `mxvision extract --dtype int8` against the fastest
peer pipeline a user would write, OpenVINO INT8 with decoding in threads (issue #16, item 5).

    .venv/bin/python bench/bench_e2e_peers.py [--rounds 5] [--wait-quiet 900] [--work DIR] [--streams]

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

``--streams``: two more pipelines in the same rounds, each engine with two streams of one thread:
mxvision with ``MXVISION_STREAMS=2`` (two copies of the network sharing its weights, run side by side
on alternate batches), OpenVINO with its ``THROUGHPUT`` hint, ``NUM_STREAMS=2`` and two infer
requests (``peer_pipeline_openvino.py --streams 2``).

All write every film's (2048, 7, 7) features once, in float32. The bench checks that the two
pipelines computed the same thing: relative L1 of each one's features against mxvision float32
of the same films (same trunk, same weights). Beside each whole process's seconds, the loop alone
(decoding and the network, from the first batch to the last features, after start-up and setup) as
each pipeline records it: mxvision's manifest (``timing.images_per_s``), the peer's JSON line.
Prints the table and writes the JSON (``--out``).
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


def folder_name(pipeline):
    return pipeline.replace(",", "").replace(" ", "-")


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
    p.add_argument("--streams", action="store_true", help="also both engines with two streams")
    args = p.parse_args()
    if args.rounds < 1 or args.threads < 1 or args.batch < 1:
        peers.fail("--rounds, --threads and --batch must be >= 1")
    if args.streams and (args.threads < 2 or args.threads % 2):
        peers.fail("--streams needs an even --threads (two streams of --threads / 2 each)")
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
    files = peers.prepare_files(argparse.Namespace(calibration_images=64, batch=args.batch,
                                                   realistic_batchnorm=False), work)
    ov_model = work / "ov-int8.xml"
    if not ov_model.is_file():
        peers.log("quantizing with NNCF in the peer venv")
        worker = peers.Worker(peers_py, "peers", work, {"OMP_NUM_THREADS": str(args.threads)})
        info = worker.call(cmd="quantize", tool="nncf", out=str(ov_model))
        worker.close()
        (work / "ov-int8.xml.json").write_text(json.dumps(info))
    mxv = str(Path(sys.executable).parent / "mxvision")
    env = {k: v for k, v in os.environ.items() if k not in ("MXVISION_STREAMS", "MXNET_CPU_WORKER_NTHREADS")}
    env["OMP_NUM_THREADS"] = str(args.threads)
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
    envs = {name: env for name in commands}
    if args.streams:
        commands["mxvision int8, 2 streams"] = commands["mxvision int8"]
        # OMP_NUM_THREADS as use_every_core sets it for 2 streams (the base env's would be kept)
        envs["mxvision int8, 2 streams"] = dict(env, MXVISION_STREAMS="2", OMP_NUM_THREADS=str(max(1, args.threads // 2)))
        commands["openvino int8, 2 streams"] = lambda d: commands["openvino int8"](d) + ["--streams", "2"]
        envs["openvino int8, 2 streams"] = env
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
            folder = runs / f"{folder_name(name)}-{r}"
            shutil.rmtree(folder, ignore_errors=True)  # a fresh folder: mxvision would resume a finished store
            row["seconds"][name], reported = timed(commands[name](folder), envs[name])
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
    store_paths = [it["path"] for it in FeatureStore(runs / "fp32").items]
    features = {}
    for name in names:
        folder = runs / f"{folder_name(name)}-0"
        if name.startswith("mxvision"):
            feats, _, got = FeatureStore(folder).load(verify=False)
        else:
            feats, got = np.load(folder / "features.npy"), (folder / "paths.txt").read_text().split()
        if list(got) != list(ids if name.startswith("mxvision") else store_paths) or feats.shape != reference.shape:
            peers.fail(f"{name} did not write the same films in the same order")
        features[name] = feats
    n = len(ids)
    table = {}
    for name in names:
        secs = [row["seconds"][name] for row in result["rounds"]]
        med = statistics.median(secs)
        table[name] = {"median_seconds": round(med, 2), "min": round(min(secs), 2), "max": round(max(secs), 2),
                       "images_per_s": round(n / med, 1),
                       "features_vs_mxvision_fp32_rel_l1": round(rel_l1(features[name], reference), 5)}

    # The loop alone (decoding and the network, from the first batch to the last shard), from each
    # pipeline's own record: mxvision's manifest, the peer's JSON line.
    for r, row in enumerate(result["rounds"]):
        row["loop_images_per_s"] = {}
        for name in names:
            if name.startswith("mxvision"):
                manifest = json.loads((runs / f"{folder_name(name)}-{r}" / "manifest.json").read_text())
                rate = manifest["timing"]["images_per_s"]
            else:
                report = row["peer_report"][name]
                rate = report["images"] / report["loop_seconds"]
            row["loop_images_per_s"][name] = round(rate, 1)
    for name in names:
        table[name]["loop_images_per_s"] = round(statistics.median(
            row["loop_images_per_s"][name] for row in result["rounds"]), 1)

    def ratio(mine, peer):  # speed of mine / speed of peer: by medians, and the median of the rounds'
        paired = [row["seconds"][peer] / row["seconds"][mine] for row in result["rounds"]]
        loops = [row["loop_images_per_s"][mine] / row["loop_images_per_s"][peer] for row in result["rounds"]]
        return {"medians": round(table[peer]["median_seconds"] / table[mine]["median_seconds"], 2),
                "paired": round(statistics.median(paired), 2),
                "loop_medians": round(table[mine]["loop_images_per_s"] / table[peer]["loop_images_per_s"], 2),
                "loop_paired": round(statistics.median(loops), 2)}
    main_ratio = ratio("mxvision int8", "openvino int8")
    result["mxvision_over_openvino_loop"] = {k: main_ratio[k] for k in ("loop_medians", "loop_paired")}
    result.update(images=n, engines=table, peer_quantization=json.loads((work / "ov-int8.xml.json").read_text()),
                  mxvision_over_openvino_speed=main_ratio["medians"], paired_ratio_median=main_ratio["paired"],
                  loadavg_at_end=[round(a, 2) for a in os.getloadavg()])
    if args.streams:
        result["with_streams"] = {
            "mxvision int8, 2 streams / openvino int8, 2 streams": ratio("mxvision int8, 2 streams",
                                                                         "openvino int8, 2 streams"),
            "mxvision int8, 2 streams / mxvision int8": ratio("mxvision int8, 2 streams", "mxvision int8"),
            "openvino int8, 2 streams / openvino int8": ratio("openvino int8, 2 streams", "openvino int8")}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nfiles -> shards, {n} films, whole processes, median of {args.rounds} interleaved rounds")
    print("| pipeline | seconds (median) | min-max | images/s | loop images/s (median) | "
          "feature rel. L1 vs mxvision fp32 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, t in table.items():
        print(f"| {name} | {t['median_seconds']} | {t['min']}-{t['max']} | {t['images_per_s']} | "
              f"{t['loop_images_per_s']} | {t['features_vs_mxvision_fp32_rel_l1']} |")
    print(f"mxvision speed / OpenVINO speed: {result['mxvision_over_openvino_speed']} "
          f"(paired median {result['paired_ratio_median']}); the loop alone {main_ratio['loop_medians']} "
          f"(paired {main_ratio['loop_paired']})")
    for key, value in result.get("with_streams", {}).items():
        print(f"{key}: {value['medians']} (paired {value['paired']}); the loop alone "
              f"{value['loop_medians']} (paired {value['loop_paired']})")
    print(f"wrote {out}")
    if work_tmp:
        work_tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
