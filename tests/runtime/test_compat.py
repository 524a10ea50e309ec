"""mxvision.runtime.compat: MXNet 1.9.1 on the NumPy and onnx of each supported Python.

The checks run in fresh interpreters, as a user's program would: NumPy untouched until MXNet is
imported, then exactly the missing names restored, NumPy's own names and behaviour unchanged, and
the two MXNet code paths that NumPy 2 / onnx >= 1.15 break (RecordIO packing, ONNX export) working.
"""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mxvision.runtime import compat

REPO = Path(__file__).resolve().parents[2]


def _run(code, *flags):
    done = subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_every_entry_names_the_mxnet_line_that_needs_it():
    for name, (make, where) in compat.NUMPY_NAMES.items():
        assert where.startswith("mxnet/") and (":" in where), (name, where)


def test_importing_the_module_under_w_error_changes_nothing_until_mxnet_loads():
    out = _run("import sys, mxvision.runtime.compat as c; c.install(); "
               "print(sorted(m for m in ('numpy', 'mxnet', 'onnx') if m in sys.modules))", "-W", "error")
    assert out.strip() == "[]"


def test_numpy_keeps_its_own_names_and_behaviour():
    """Restoring never replaces what NumPy has (np.bool on NumPy 2 is NumPy's own type), sets only
    names that raise AttributeError, and NumPy computes as before."""
    code = r"""
import json, warnings
import numpy as np
def snapshot():
    found = {}
    for name in dir(np):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                found[name] = id(getattr(np, name))
            except AttributeError:
                pass
    return found
before = snapshot()
from mxvision.runtime import compat
restored = compat.restore_numpy_names()
after = snapshot()
changed = [n for n in before if after.get(n) != before[n]]
missing_before = []
for name in compat.NUMPY_NAMES:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            getattr(np, name)
        except AttributeError:
            missing_before.append(name)
x = np.array([3.0, -1.0, 2.5])
print(json.dumps({"changed": changed, "restored": restored, "unresolved": missing_before,
                  "bool": repr(np.bool_(True)), "sum": float(np.sum(x)), "isin": np.isin([1, 5], [5]).tolist(),
                  "version": np.__version__}))
"""
    got = json.loads(_run(code, "-W", "error"))
    assert got["changed"] == []  # no attribute NumPy had was replaced
    assert got["unresolved"] == []  # every name MXNet needs resolves now
    assert set(got["restored"]) <= set(compat.NUMPY_NAMES)
    assert got["sum"] == 4.5 and got["isin"] == [False, True]


def test_mxnet_imports_and_its_numpy_2_code_paths_work(tmp_path):
    """RecordIO packing (`ndarray.tostring` is gone in NumPy 2.3) and a restored name in use."""
    code = f"""
import mxvision
import mxnet as mx
import numpy as np
header = mx.recordio.IRHeader(0, [1.0, 2.0], 7, 0)
packed = mx.recordio.pack(header, b"payload")
h, s = mx.recordio.unpack(packed)
assert s == b"payload" and list(h.label) == [1.0, 2.0] and h.id == 7
w = mx.recordio.MXIndexedRecordIO({str(tmp_path / 'a.idx')!r}, {str(tmp_path / 'a.rec')!r}, "w")
w.write_idx(0, packed); w.close()
assert float(mx.nd.array([1.0, 2.0]).sum().asscalar()) == 3.0
print(np.PZERO, np.NINF, mx.__version__)
"""
    out = _run(code)
    assert out.split()[:2] == ["0.0", "-inf"] and out.split()[2] == "1.9.1"


def test_onnx_export_finds_the_mapping_it_needs(tmp_path):
    pytest.importorskip("onnx")
    code = f"""
import mxvision
import mxnet as mx, numpy as np
from mxnet import gluon
net = gluon.nn.HybridSequential()
net.add(gluon.nn.Dense(3))
net.initialize()
net.hybridize()
net(mx.nd.zeros((1, 4)))
net.export({str(tmp_path / 'net')!r})
out = mx.onnx.export_model({str(tmp_path / 'net-symbol.json')!r}, {str(tmp_path / 'net-0000.params')!r},
                           [(1, 4)], [np.float32], {str(tmp_path / 'net.onnx')!r})
from onnx import mapping
print(mapping.NP_TYPE_TO_TENSOR_TYPE[np.dtype('float32')])
"""
    assert _run(code).split()[-1] == "1"  # TensorProto.FLOAT
    assert (tmp_path / "net.onnx").stat().st_size > 0


def test_gluoncv_imports_beside_torch_2_and_torch_stays():
    """gluoncv 0.10.5 raises at import when torch >= 2 is importable (as in the parity venv)."""
    pytest.importorskip("torch")
    out = _run("import sys, torch\n"
               "from mxvision.runtime import compat\n"
               "compat.import_gluoncv()\n"
               "from gluoncv.model_zoo import get_model\n"
               "assert sys.modules['torch'] is torch\n"
               "import torch.nn\n"
               "print(type(get_model('mobilenetv3_small', pretrained=False)).__name__)")
    assert out.strip() == "_MobileNetV3"
    # and without torch imported first: torch is importable afterwards, unchanged
    out = _run("import sys\nfrom mxvision.runtime import compat\ncompat.import_gluoncv()\n"
               "assert 'torch' not in sys.modules\nimport torch\nprint(torch.__version__)")
    assert out.strip()


def _imports_in_order(source):
    """Top-level names of every import statement in ``source``, in source order."""
    nodes = [n for n in ast.walk(ast.parse(source)) if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = []
    for node in sorted(nodes, key=lambda n: (n.lineno, n.col_offset)):
        modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        names += [m.split(".")[0] for m in modules]
    return names


def _scripts():
    """bench/*.py, and each notebook's code as one source (magics dropped)."""
    for path in sorted((REPO / "bench").glob("*.py")):
        yield path, path.read_text(encoding="utf-8")
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
        lines = [line for line in "\n".join(code).splitlines() if not line.lstrip().startswith(("%", "!"))]
        yield path, "\n".join(lines)


def test_every_script_and_notebook_imports_mxvision_before_mxnet():
    """On NumPy 2 (Python 3.13) MXNet 1.9.1 only imports after mxvision.runtime.compat has run;
    a bench that imported mxnet first died with "np.PZERO was removed"."""
    checked = 0
    for path, source in _scripts():
        names = [n for n in _imports_in_order(source) if n in ("mxnet", "mxvision")]
        if names:
            checked += 1
            assert names[0] == "mxvision", f"{path.relative_to(REPO)} imports mxnet before mxvision"
    assert checked >= 8, checked


def test_the_import_order_check_sees_a_late_mxvision():
    late = "import os\ndef f():\n    import mxnet\nimport mxvision.data\n"
    assert [n for n in _imports_in_order(late) if n in ("mxnet", "mxvision")] == ["mxnet", "mxvision"]


def test_mxnet_loads_without_sklearn_which_still_imports_afterwards():
    """mxnet/model.py imports sklearn.base for its legacy FeedForward only: hidden during MXNet's
    import, so the command line starts ~1 s sooner; scikit-learn itself is untouched."""
    out = _run("import sys, mxvision\nimport mxnet as mx\nprint('sklearn' in sys.modules)\n"
               "from sklearn.model_selection import StratifiedGroupKFold\nprint(StratifiedGroupKFold.__name__)\n"
               "print(mx.model.FeedForward.__mro__[1].__name__)")
    assert out.split() == ["False", "StratifiedGroupKFold", "object"]
    # imported before MXNet, sklearn is left alone: FeedForward is MXNet's usual BaseEstimator
    out = _run("import sklearn.base, mxvision\nimport mxnet as mx\n"
               "print(issubclass(mx.model.FeedForward, sklearn.base.BaseEstimator))")
    assert out.split() == ["True"]


def test_the_command_line_parser_does_not_import_sklearn():
    out = _run("import sys\nfrom mxvision.cli import build_parser\nbuild_parser()\n"
               "print(sorted(m for m in ('sklearn', 'pandas', 'mxnet') if m in sys.modules))")
    assert out.strip() == "['mxnet']"
