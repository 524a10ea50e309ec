"""README's main command, `mxvision demo`, run exactly as a user would (default settings)."""
import json
import subprocess
import sys
import time

import mxnet as mx
import numpy as np
from mxnet import gluon


def test_default_demo_runs_end_to_end_within_five_minutes(tmp_path):
    out = tmp_path / "demo"
    tic = time.time()
    result = subprocess.run([sys.executable, "-m", "mxvision", "demo", "--out", str(out), "--quiet"],
                            capture_output=True, text=True, timeout=900)
    seconds = time.time() - tic
    assert result.returncode == 0, result.stderr
    assert seconds < 300, f"demo took {seconds:.0f} s"
    text = result.stdout
    assert "Backbone weights:" in text and ("RANDOM" in text or "weights from" in text)
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert str(out / "eval" / "metrics.json") in text
    assert metrics["confusion_matrix_png"] in text
    assert np.array(metrics["confusion_matrix"]).sum() == metrics["n"] > 0
    assert 0.0 <= metrics["auc"] <= 1.0 and 0.0 <= metrics["accuracy"] <= 1.0
    symbol, params = out / "model" / "xvision-symbol.json", out / "model" / "xvision-0000.params"
    assert f"{symbol} + {params}" in text
    net = gluon.SymbolBlock.imports(str(symbol), ["data"], str(params))
    probs = net(mx.nd.zeros((2, 3, 224, 224))).asnumpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    # the demo's data are generated deterministically: a second generation is byte-identical
    from mxvision.data.synth import make_synthetic_dataset
    again = make_synthetic_dataset(tmp_path / "again", n_per_class=40, size=256, seed=0)
    assert open(again).read() == (out / "data" / "index.csv").read_text()
