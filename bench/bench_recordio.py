"""How much faster a repeated extraction reads its images from RecordIO than from PNG/JPEG files.

    .venv/bin/python bench/bench_recordio.py                          # JSRT from ../shared
    .venv/bin/python bench/bench_recordio.py --root DIR --preset imagenet224 --repeats 3
    .venv/bin/python bench/bench_recordio.py --index some.csv --extract

What is timed, on the same images and with the same 2 decoding threads feature extraction uses:

* **files**: ``transforms.load_image`` on every image (decode PNG/JPEG/DICOM, centre-crop, resize,
  normalise) -- the input side of every ``mxvision extract`` run today;
* **pack**: the one-off ``mxvision data pack`` (decode + crop + resize + encode + write);
* **recordio**: ``record_reader.load_image`` on every ``NAME.rec#KEY`` (read, PNG-decode the 224 px
  uint8 square, normalise) -- the input side of a second run from the pack.

Each route is run ``--repeats`` times and the fastest run is reported (the page cache is warm after
the first, as it is for a "second run"). ``--extract`` also times two whole feature extractions
(ResNet-50 v2 trunk, random weights: the compute is the same as with ImageNet weights) -- one on
the files, one on the pack (extraction reads a pack's ``NAME.rec#KEY`` paths itself).
"""
import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mxvision.data import transforms  # noqa: E402
from mxvision.runtime import shared_dir  # noqa: E402
from mxvision.data.index import read_index  # noqa: E402
from mxvision.data.jsrt import read_jsrt  # noqa: E402
from mxvision.data import record_reader, recordio  # noqa: E402


def _time_loading(paths, load, preset, workers, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(lambda p: load(p, preset), paths):
                pass
        best = min(best, time.perf_counter() - start)
    return best


def _time_extract(index, out, preset, repeats):
    """Fastest whole extraction of ``index`` (files, or a pack's index of ``NAME.rec#KEY``)."""
    from mxvision.features.extract import extract_features

    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        extract_features(index, out, backbone="resnet50_v2", weights="none", preset=preset,
                         ctx="cpu", batch_size=16, progress=False, overwrite=True)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=None, help="JSRT folder (default ../shared/data/jsrt)")
    parser.add_argument("--index", default=None, help="any index CSV instead of JSRT")
    parser.add_argument("--preset", default="imagenet224")
    parser.add_argument("--encoding", default="png", choices=record_reader.ENCODINGS)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--extract", action="store_true", help="also time whole extractions")
    args = parser.parse_args(argv)

    if args.index:
        index = read_index(args.index)
    else:
        root = args.root or (os.path.join(shared_dir(), "data", "jsrt") if shared_dir() else None)
        if root is None:
            parser.error("no ../shared; pass --root or --index")
        index = read_jsrt(root)
    preset = transforms.get_preset(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        rec = os.path.join(tmp, "bench.rec")
        start = time.perf_counter()
        recordio.pack_index(index, rec, preset=preset, encoding=args.encoding,
                            workers=args.workers, progress=False)
        pack_s = time.perf_counter() - start
        packed = read_index(rec[:-4] + ".csv")
        files_s = _time_loading(index.paths, transforms.load_image, preset, args.workers,
                                args.repeats)
        rec_s = _time_loading(packed.paths, record_reader.load_image, preset, args.workers,
                              args.repeats)
        n = len(index)
        size_mb = os.path.getsize(rec) / 1e6
        print(f"{n} images from {index.source}, preset {preset.name}, {args.workers} threads, "
              f"best of {args.repeats}")
        print(f"  files    : {files_s:7.3f} s  ({1000 * files_s / n:6.2f} ms/image)")
        print(f"  pack     : {pack_s:7.3f} s  once ({args.encoding}, {size_mb:.1f} MB)")
        print(f"  recordio : {rec_s:7.3f} s  ({1000 * rec_s / n:6.2f} ms/image)")
        print(f"  image loading from RecordIO is {files_s / rec_s:.1f}x faster "
              f"(saves {files_s - rec_s:.2f} s per run; the pack pays for itself after "
              f"{pack_s / max(files_s - rec_s, 1e-9):.1f} runs)")
        if args.extract:
            e_files = _time_extract(index, os.path.join(tmp, "f_files"), preset, args.repeats)
            e_rec = _time_extract(packed, os.path.join(tmp, "f_rec"), preset, args.repeats)
            print(f"  whole extraction (resnet50_v2, CPU): files {e_files:.2f} s, "
                  f"recordio {e_rec:.2f} s -> {e_files / e_rec:.2f}x")


if __name__ == "__main__":
    main()
