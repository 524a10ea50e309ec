"""Regenerate the results table of README.md from the commands it names, and check it.

    .venv/bin/python bench/figures.py            # run the commands, print the table as markdown
    .venv/bin/python bench/figures.py --write    # ... and rewrite README's table (make figures)
    .venv/bin/python bench/figures.py --skip-jsrt --work /tmp/figs
    .venv/bin/python bench/figures.py --synth 0 2    # the figures quoted in mxvision/data/synth.py

Rows (each produced by running the real CLI in a subprocess, as a user would):

* **synthetic demo**: ``mxvision demo --out WORK/demo --quiet`` (160 generated pairs, 320 films,
  seed 0, random backbone weights unless ImageNet weights are cached) -- about 1 min on 2 cores;
* **JSRT**: ``mxvision data index jsrt`` on ``../shared/data/jsrt`` (or ``MXVISION_SHARED``),
  ``mxvision extract --weights none``, ``mxvision train``, ``mxvision evaluate`` -- about 1 min;
* **NIH, external**: ``mxvision data index nih --views frontal`` on ``../shared/data/nih``,
  ``mxvision extract``, and ``mxvision evaluate --run <the JSRT run> --features <NIH store>``: an
  external validation of the JSRT head on every one of the 538 films -- about 40 s.
  Without the shared folder both rows are skipped (README keeps them, and this says so).

The real-data table sits in README.md between ``<!-- figures:results start -->`` and
``<!-- figures:results end -->``; the demo's table, one row per CPU model and NumPy version,
between ``<!-- figures:demo start -->`` and ``<!-- figures:demo end -->``. ``--write`` replaces what
is between them (the tables and a line saying when, where and how they were measured) and nothing
else; in the demo table it replaces this machine's row and keeps the other platforms' rows.
``tests/test_demo.py`` reads the demo rows back (:func:`demo_rows`) and asserts that ``mxvision
demo`` gives exactly this platform's row, so README and the demo cannot drift apart unnoticed.

Why a row per platform: the demo is deterministic on one machine, but the float rounding of
oneDNN's convolutions, of OpenBLAS and of NumPy's own reductions depends on the CPU (measured: the
same commit gives accuracy 0.625 / AUC 0.703 on an AMD EPYC and 0.575 / 0.688 on an Intel Xeon) and
on the NumPy version (1.23, 1.26 and 2.x each give their own figures).

``--synth SEED...`` prints, per seed, the figures ``mxvision/data/synth.py`` quotes: the demo's
test AUC (``mxvision demo --seed SEED``), a 5-fold logistic regression on its stored features
(all images, folds grouped by patient so a pair stays together) and every baseline of the
shortcut audit; it does not touch README.
"""
import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
START = "<!-- figures:results start -->"
END = "<!-- figures:results end -->"
HEADER = ("data", "split (by patient)", "test accuracy", "test AUC",
          "AUC 95% CI (bootstrap over patients; DeLong)",
          "confusion matrix (rows: true normal, nodule)", "best trivial baseline, test AUC")
DEMO_START = "<!-- figures:demo start -->"
DEMO_END = "<!-- figures:demo end -->"
#: The demo table: the platform (CPU model as /proc/cpuinfo names it, NumPy major.minor), the
#: figures in the columns of the results table after its first, and when and with what Python.
DEMO_HEADER = ("CPU", "NumPy") + HEADER[1:] + ("measured",)
JSRT_ROW = "JSRT development set (154 real radiographs)"
#: External validation: the JSRT row's run scored on every frontal NIH film of ../shared with a
#: Normal or Nodule label (another hospital and country; no shared patients or pixels).
EXTERNAL_ROW = "NIH, 538 frontal films: external, head trained on JSRT"
SPLITS = ("train", "val", "test")
#: The OpenMP threads every command runs with. The count sets the float rounding of oneDNN's
#: reductions in head training, hence the figures: fixed, they reproduce on any core count (2 is
#: also what mxvision picks by itself on a 2-core machine; tests/test_demo.py uses the same).
FIGURE_THREADS = "2"


def table_rows(readme_text, start=START, end=END):
    """The rows of the markdown table between ``start`` and ``end``, as ``{column header: cell}``."""
    try:
        block = readme_text.split(start, 1)[1].split(end, 1)[0]
    except IndexError:
        raise ValueError(f"README has no {start} ... {end} block") from None
    lines = [line.strip() for line in block.splitlines() if line.strip().startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    header, rows = cells[0], cells[2:]
    return [dict(zip(header, row)) for row in rows]


def results_rows(readme_text):
    """The rows of README's results table as ``{first cell: {column header: cell}}``."""
    return {row[HEADER[0]]: row for row in table_rows(readme_text)}


def demo_rows(readme_text):
    """The rows of README's demo table as ``{(CPU, NumPy): {column header: cell}}``."""
    return {(row["CPU"], row["NumPy"]): row for row in table_rows(readme_text, DEMO_START, DEMO_END)}


def cpu_model():
    """The CPU as the demo table names it: its model name as /proc/cpuinfo gives it
    (``platform.processor()`` elsewhere), with " (AVX2)" when it has no AVX-512: oneDNN then runs
    other float32 kernels, and an AMD EPYC of either kind gives other figures under the same name."""
    sys.path.insert(0, str(REPO))
    from mxvision.runtime import cpu_info

    model, flags = cpu_info()
    return model + (" (AVX2)" if flags and "avx512f" not in flags else "")


def platform_key():
    """(CPU, NumPy major.minor): what the demo's float rounding depends on besides threads."""
    import numpy

    return cpu_model(), ".".join(numpy.__version__.split(".")[:2])


def mxvision(*args, cwd):
    """Run ``python -m mxvision ARGS`` on this checkout's package; its stdout + stderr."""
    env = dict(os.environ, OMP_NUM_THREADS=FIGURE_THREADS)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "mxvision", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"mxvision {' '.join(map(str, args))} failed ({done.returncode}):\n"
                         f"{done.stdout}{done.stderr}")
    return done.stdout + done.stderr


def split_counts(index_csv):
    with open(index_csv, newline="") as f:
        splits = [row["split"] for row in csv.DictReader(f)]
    return " / ".join(str(splits.count(s)) for s in SPLITS)


def table_row(name, index_csv, metrics, split=None):
    audit = metrics.get("shortcut_audit") or {}
    if audit.get("best_baseline"):
        baseline = f"{audit['best_baseline']} {audit['best_baseline_auc']:.3f}"
        baseline += ": the audit warns" if audit.get("warn") else ""
    else:
        baseline = "not audited"
    intervals = metrics.get("auc_intervals") or {}
    if intervals.get("ci_bootstrap"):
        ci = "[{:.3f}, {:.3f}]; [{:.3f}, {:.3f}]".format(*intervals["ci_bootstrap"], *intervals["ci_delong"])
    else:
        ci = "not measured"
    return (name, split or split_counts(index_csv), f"{metrics['accuracy']:.3f}",
            f"{metrics['auc']:.3f}", ci, json.dumps(metrics["confusion_matrix"]), baseline)


def demo_row(index_csv, metrics):
    """This platform's row of the demo table from the demo's index and metrics, without the
    "measured" cell (the figures a run of the demo can be compared on)."""
    return platform_key() + table_row(None, index_csv, metrics)[1:]


def demo_figures(work):
    tic = time.time()
    mxvision("demo", "--out", work / "demo", "--quiet", cwd=work)
    metrics = json.loads((work / "demo" / "eval" / "metrics.json").read_text())
    return demo_row(work / "demo" / "data" / "index.csv", metrics), time.time() - tic


def jsrt_figures(work, shared):
    mxvision("data", "index", "jsrt", "--root", shared / "data" / "jsrt", "--out", "jsrt.csv", cwd=work)
    tic = time.time()
    mxvision("extract", "--index", "jsrt.csv", "--out", "feat_r50", "--weights", "none", "--ctx", "cpu",
             "--quiet", cwd=work)
    extract_seconds = time.time() - tic
    mxvision("train", "--features", "feat_r50", "--out", "run_r50", "--ctx", "cpu",
             "--keep-checkpoints", "1", "--quiet", cwd=work)
    mxvision("evaluate", "--run", "run_r50", "--out", "run_r50/eval-test", "--ctx", "cpu", cwd=work)
    metrics = json.loads((work / "run_r50" / "eval-test" / "metrics.json").read_text())
    return table_row(JSRT_ROW, work / "jsrt.csv", metrics), extract_seconds


def external_figures(work, shared):
    """The JSRT run (:func:`jsrt_figures` first) evaluated on NIH's frontal Normal/Nodule films."""
    nih = shared / "data" / "nih"
    mxvision("data", "index", "nih", "--csv", nih / "Data_Entry_2017_v2020.csv.gz", "--images",
             nih / "images", "--views", "frontal", "--out", "nih.csv", cwd=work)
    mxvision("extract", "--index", "nih.csv", "--out", "feat_nih", "--weights", "none", "--ctx", "cpu",
             "--quiet", cwd=work)
    printed = mxvision("evaluate", "--run", "run_r50", "--features", "feat_nih", "--out",
                       "run_r50/eval-nih", "--ctx", "cpu", cwd=work)
    print(f"mxvision evaluate --run run_r50 --features feat_nih printed:\n{printed}", file=sys.stderr)
    metrics = json.loads((work / "run_r50" / "eval-nih" / "metrics.json").read_text())
    return table_row(EXTERNAL_ROW, None, metrics, split=f"all {metrics['n']} (external)")


def synth_figures(work, seed):
    """The demo at ``seed``: its test AUC, a 5-fold CV logistic regression on its features, and
    the audit's trivial baselines (what the synthetic data's docstring quotes). The folds are
    grouped by patient: the two films of a pair share their anatomy, and a pair split across
    folds would let the regression learn that patient (every patient has one film of each class,
    so the folds are balanced without stratifying)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, cross_val_score
    from mxvision.features.store import FeatureStore

    out = work / f"demo-seed{seed}"
    mxvision("demo", "--out", out, "--seed", seed, "--quiet", cwd=work)
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    store = FeatureStore(out / "features")
    x, y, ids = zip(*(store.load(s) for s in SPLITS))
    x, y = np.concatenate(x), np.concatenate(y)
    patient = {item["id"]: item["patient_id"] for item in store.items}
    groups = [patient[i] for part in ids for i in part]
    cv_auc = cross_val_score(LogisticRegression(max_iter=2000), x.reshape(len(x), -1), y, groups=groups,
                             scoring="roc_auc", cv=GroupKFold(5))
    audit = metrics["shortcut_audit"]
    baselines = ", ".join(f"{name} {r['auc']:.3f}" for name, r in audit["baselines"].items())
    return (f"seed {seed}: head test AUC {metrics['auc']:.3f} (n={metrics['n']}); 5-fold logistic "
            f"regression on the features AUC {cv_auc.mean():.3f}; trivial baselines on the test "
            f"split: {baselines}")


def machine():
    model = cpu_model()
    load = f", load average {os.getloadavg()[0]:.1f} at the start" if hasattr(os, "getloadavg") else ""
    threads = f"OMP_NUM_THREADS={FIGURE_THREADS}"
    import numpy

    python = f"Python {platform.python_version()}, NumPy {numpy.__version__}"
    return f"{model}, {os.cpu_count()} cores ({python}, {threads}{load})"


def markdown(rows, note, header=HEADER):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines + [""] + textwrap.wrap(note, 100, break_on_hyphens=False))


def replace_block(text, start, end, block):
    if start not in text or end not in text:
        raise SystemExit(f"{README}: no {start} ... {end} block to rewrite")
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    return f"{head}{start}\n{block}\n{end}{tail}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite README's results table")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--shared", type=Path,
                        help="real-data folder (default: MXVISION_SHARED or ../shared)")
    parser.add_argument("--skip-jsrt", action="store_true")
    parser.add_argument("--synth", type=int, nargs="+", metavar="SEED",
                        help="print synth.py's figures for these demo seeds instead")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from mxvision.runtime import shared_dir

    shared = args.shared or shared_dir()
    old = results_rows(README.read_text())
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    where = machine()
    if args.work and args.work.is_dir() and any(args.work.iterdir()):
        parser.error(f"--work {args.work} is not empty: the commands would resume earlier runs there")
    with tempfile.TemporaryDirectory(prefix="mxvision-figures-") as tmp:
        work = (args.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        if args.synth:
            for seed in args.synth:
                print(synth_figures(work, seed))
            return
        demo, demo_seconds = demo_figures(work)
        demo += (f"{started[:10]}, Python {platform.python_version()}",)
        rows, notes = [], []
        if args.skip_jsrt or shared is None or not (shared / "data" / "jsrt").is_dir():
            why = "--skip-jsrt" if args.skip_jsrt else "no ../shared/data/jsrt (set MXVISION_SHARED)"
            print(f"JSRT rows skipped ({why}); README keeps its results table", file=sys.stderr)
        else:
            jsrt, extract_seconds = jsrt_figures(work, shared.resolve())
            rows.append(jsrt)
            notes.append(f"JSRT extraction 154 images in {extract_seconds:.0f} s end to end "
                         f"({154 / extract_seconds:.1f} images/s, process start included)")
            rows.append(external_figures(work, shared.resolve()))
    # without the JSRT rows the results table (and the note saying where it was measured) stays
    note = (f"Measured {started} by `make figures` (`bench/figures.py`: the commands below, run "
            f"through the CLI) on {where}: {'; '.join(notes)}.")
    old_demo = demo_rows(README.read_text())
    platforms = {**old_demo, demo[:2]: dict(zip(DEMO_HEADER, demo))}
    demo_table = [tuple(row.get(h, "not measured") for h in DEMO_HEADER)
                  for _, row in sorted(platforms.items())]
    demo_note = (f"This machine's row measured {started} by `make figures` (`mxvision demo --quiet`, "
                 f"{demo_seconds:.0f} s) on {where}; the other rows kept from the runs they name.")
    block, demo_block = markdown(rows, note), markdown(demo_table, demo_note, DEMO_HEADER)
    print((block + "\n\n" if rows else "") + demo_block)
    for row in rows:
        before = old.get(row[0])
        if before and tuple(before.get(h) for h in HEADER) != row:
            print(f"changed: {row[0]}: README had {list(before.values())[1:]}", file=sys.stderr)
    before = old_demo.get(demo[:2])
    if before and tuple(before.get(h) for h in DEMO_HEADER[:-1]) != demo[:-1]:
        print(f"changed: the demo on {demo[:2]}: README had {list(before.values())[2:-1]}", file=sys.stderr)
    if args.write:
        text = README.read_text()
        if rows:
            text = replace_block(text, START, END, block)
        README.write_text(replace_block(text, DEMO_START, DEMO_END, demo_block))
        print(f"rewrote the {'results and ' if rows else ''}demo tables in {README}", file=sys.stderr)


if __name__ == "__main__":
    main()
