"""Where the CPU of one extraction goes: per-thread CPU time of ``extract_features`` (not a test).

    python bench/profile_extract.py --dtype int8 --images 768 --loader thread
    python bench/profile_extract.py --dtype int8 --images 384 --dicom --loader process
    python bench/profile_extract.py --dtype int8 --index pack.csv     # e.g. a pack's index

Builds the input once (the JSRT PNGs copied round-robin to ``--images`` files in a folder per
class, or the same images as 12-bit DICOMs with ``--dicom``; or any ``--index``), runs one warm-up
extraction (builds the network; INT8 is calibrated once and cached), then ``--repeats`` timed
extractions, each followed by the CPU seconds of every thread of this process that ran during it
(Linux ``/proc/self/task``: the network's OpenMP threads are the two largest), of the main thread
(setup included), of the other threads (decode threads, shard writer, MXNet's engine; most have
exited by then, so: the process's CPU minus those) and of finished decode processes. Random backbone weights: the cost does not depend on them.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mxvision.features.extract import extract_features  # noqa: E402  (mxvision sets the threads)


def thread_cpu():
    """{thread id: CPU seconds} of this process's live threads."""
    out, tick = {}, os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = open(f"/proc/self/task/{tid}/stat").read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def make_inputs(n, folder, dicom):
    from mxvision.runtime import shared_dir

    shared = shared_dir()
    if shared is None:
        sys.exit("needs the JSRT images in ../shared (or pass --index)")
    sources = sorted((shared / "data" / "jsrt" / "images").glob("*.png"))
    if dicom:
        import cv2
        sys.path.insert(0, str(REPO / "tests"))
        from dicom_builders import dicom_bytes
    for k in range(n):
        label = "nodule" if sources[k % len(sources)].name.startswith("JPCLN") else "normal"
        (folder / label).mkdir(parents=True, exist_ok=True)
        src = sources[k % len(sources)]
        if dicom:
            img = cv2.imread(str(src), cv2.IMREAD_GRAYSCALE).astype("uint16") * 16  # 12-bit
            (folder / label / f"{k:05d}.dcm").write_bytes(dicom_bytes(img, bits_stored=12, PatientID=str(k)))
        else:
            shutil.copyfile(src, folder / label / f"{k:05d}.png")
    return folder


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="int8", choices=["float32", "bfloat16", "int8"])
    p.add_argument("--images", type=int, default=768)
    p.add_argument("--dicom", action="store_true", help="12-bit DICOM copies instead of the PNGs")
    p.add_argument("--index", default=None, help="extract this index CSV or folder instead")
    p.add_argument("--loader", default="thread", choices=["thread", "process"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mxvision-profile-"))
    os.environ.setdefault("MXVISION_CACHE", str(work / "cache"))
    try:
        source = args.index or make_inputs(args.images, work / "images", args.dicom)
        kw = dict(weights="none", overwrite=True, progress=False, dtype=args.dtype,
                  batch_size=args.batch, loader=args.loader, workers=args.workers)
        extract_features(source, work / "features", **kw)  # warm-up: network built, INT8 cached
        main_tid = threading.get_native_id()
        for _ in range(args.repeats):
            before, tic, t0 = thread_cpu(), os.times(), time.time()
            store = extract_features(source, work / "features", **kw)
            wall, after, toc = time.time() - t0, thread_cpu(), os.times()
            per_thread = sorted(((c - before.get(t, 0.0), t) for t, c in after.items()), reverse=True)
            n = store.manifest["timing"]["images"]
            main_s = next(c for c, t in per_thread if t == main_tid)
            threads = [round(c, 2) for c, t in per_thread if t != main_tid and c >= 0.05]
            process_s = toc.user + toc.system - tic.user - tic.system
            print(json.dumps({
                "timing": store.manifest["timing"], "wall_seconds": round(wall, 2),
                "largest_threads_cpu_s": threads[:2], "main_thread_cpu_s": round(main_s, 2),
                # decode threads, shard writer, MXNet's engine threads: most have exited by now
                "other_threads_cpu_s": round(process_s - sum(threads[:2]) - main_s, 2),
                "process_cpu_s": round(process_s, 2),
                "decode_processes_cpu_s": round(toc.children_user + toc.children_system
                                                - tic.children_user - tic.children_system, 2),
                "largest_two_ms_per_image": round(1000 * sum(threads[:2]) / n, 2)}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
