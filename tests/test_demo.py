"""README's main command, `mxvision demo`, run exactly as a user would (default settings)."""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mxnet as mx
import numpy as np
from mxnet import gluon

REPO = Path(__file__).resolve().parent.parent


def _figures_script():
    """bench/figures.py, the script that writes README's results table (and parses it back)."""
    spec = importlib.util.spec_from_file_location("figures", REPO / "bench" / "figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_default_demo_runs_end_to_end_within_five_minutes(tmp_path):
    out = tmp_path / "demo"
    tic = time.time()
    # the thread count sets the float rounding of head training: README's row is for 2 threads
    # (bench/figures.py runs the demo with the same), what mxvision picks itself on 2 cores
    env = dict(os.environ, OMP_NUM_THREADS=_figures_script().FIGURE_THREADS)
    result = subprocess.run([sys.executable, "-m", "mxvision", "demo", "--out", str(out), "--quiet"],
                            capture_output=True, text=True, timeout=900, env=env)
    seconds = time.time() - tic
    assert result.returncode == 0, result.stderr
    assert seconds < 300, f"demo took {seconds:.0f} s"
    text = result.stdout
    assert "Backbone weights:" in text and ("RANDOM" in text or "weights from" in text)
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert str(out / "eval" / "metrics.json") in text
    assert metrics["confusion_matrix_png"] in text
    assert np.array(metrics["confusion_matrix"]).sum() == metrics["n"] > 0
    # the demo is deterministic at its seed: it gives exactly README's row (split, accuracy, AUC,
    # confusion matrix, shortcut-audit baseline), and prints the audit's warning when README says so
    figures = _figures_script()
    # (README has one row for NumPy 1.x, one for NumPy 2: they round differently)
    row = figures.demo_row_name()
    readme = figures.results_rows((REPO / "README.md").read_text())[row]
    stated = tuple(readme[h] for h in figures.HEADER)
    measured = figures.table_row(row, out / "data" / "index.csv", metrics)
    assert measured == stated, f"README's demo row {stated[1:]} but the demo gives {measured[1:]}"
    assert json.loads(readme["test AUC"]) == round(metrics["auc"], 3)
    assert json.loads(readme[figures.HEADER[4]]) == metrics["confusion_matrix"]
    warns = "the audit warns" in readme[figures.HEADER[5]]
    printed = "WARNING: model AUC" in result.stdout + result.stderr
    assert printed == warns == metrics["shortcut_audit"]["warn"], (printed, warns)
    symbol, params = out / "model" / "xvision-symbol.json", out / "model" / "xvision-0000.params"
    assert f"{symbol} + {params}" in text
    net = gluon.SymbolBlock.imports(str(symbol), ["data"], str(params))
    probs = net(mx.nd.zeros((2, 3, 224, 224))).asnumpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    # the demo's data are generated deterministically: a second generation is byte-identical
    from mxvision.data.synth import make_synthetic_dataset
    again = make_synthetic_dataset(tmp_path / "again", n_per_class=40, size=256, seed=0)
    assert open(again).read() == (out / "data" / "index.csv").read_text()
