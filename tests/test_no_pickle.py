"""No pickle is ever loaded: a scan of mxvision's source, and the one unpickler it has.

Weights, feature stores, label files and archives come from the internet or from other people's
disks; unpickling any of them runs whatever code the file names. The scan parses every module
(AST, so comments and docstrings that *mention* ``torch.load`` do not count, and ``import pickle
as p; p.loads`` or ``from numpy import load`` do) and refuses:

* ``pickle``/``_pickle``/``cPickle``/``dill``/``cloudpickle`` ``load``/``loads`` and a direct
  ``Unpickler(...)``; ``joblib.load``, ``torch.load``, ``pandas.read_pickle``, ``shelve.open``,
  ``marshal.load(s)``; ``yaml.load``/``load_all``/``full_load``/``unsafe_load`` unless given a
  safe ``Loader``;
* any call with ``allow_pickle=True`` (``np.load``, ``np.lib.format.read_array``, ...);
* a ``pickle.Unpickler`` subclass whose ``find_class`` does not refuse (no ``raise``) or
  delegates to the base class -- a restricted unpickler must be a whitelist.

MXNet itself unpickles optimizer states in ``Trainer.load_states`` (``Updater.set_states`` calls
``pickle.loads``); that is checked separately below and is currently a known hole.
"""
import ast
import io
import pickle
import zipfile
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mxvision"

_PICKLERS = ("pickle", "_pickle", "cPickle", "dill", "cloudpickle")
FORBIDDEN = {f"{m}.{f}" for m in _PICKLERS for f in ("load", "loads", "Unpickler")} | {
    "joblib.load", "torch.load", "pandas.read_pickle", "shelve.open", "marshal.load",
    "marshal.loads", "yaml.load", "yaml.load_all", "yaml.full_load", "yaml.full_load_all",
    "yaml.unsafe_load", "yaml.unsafe_load_all"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}
UNPICKLER_BASES = {f"{m}.Unpickler" for m in _PICKLERS}


def _aliases(tree):
    """Local name -> dotted origin for every import in the module."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node, aliases):
    """``np.lib.format.read_array`` -> ``numpy.lib.format.read_array`` (None if not a name)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _truthy(node):
    return not (isinstance(node, ast.Constant) and not node.value)


def scan(source, filename="<source>"):
    """Every forbidden construct in ``source``: a list of 'file:line: what'."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _dotted(node.func, aliases) or ""
            kwargs = {k.arg: k.value for k in node.keywords if k.arg}
            if "allow_pickle" in kwargs and _truthy(kwargs["allow_pickle"]):
                found.append(f"{filename}:{node.lineno}: {name or 'call'}(allow_pickle=True)")
            if name in FORBIDDEN:
                loader = kwargs.get("Loader")
                if name.startswith("yaml.") and loader is not None and \
                        (_dotted(loader, aliases) or "").rsplit(".", 1)[-1] in SAFE_YAML_LOADERS:
                    continue
                found.append(f"{filename}:{node.lineno}: {name}()")
        elif isinstance(node, ast.ClassDef):
            if not any(_dotted(b, aliases) in UNPICKLER_BASES for b in node.bases):
                continue
            methods = {f.name: f for f in node.body if isinstance(f, ast.FunctionDef)}
            find_class = methods.get("find_class")
            if find_class is None:
                found.append(f"{filename}:{node.lineno}: Unpickler subclass {node.name} without find_class")
                continue
            if not any(isinstance(n, ast.Raise) for n in ast.walk(find_class)):
                found.append(f"{filename}:{find_class.lineno}: {node.name}.find_class never refuses")
            for n in ast.walk(find_class):
                if isinstance(n, ast.Attribute) and n.attr == "find_class":
                    found.append(f"{filename}:{n.lineno}: {node.name}.find_class delegates to the "
                                 f"unrestricted base class")
    return found


def _sources():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20  # the package is really there
    return [(str(f.relative_to(PACKAGE.parent)), f.read_text(encoding="utf-8")) for f in files]


def test_the_package_never_unpickles():
    found = [hit for name, text in _sources() for hit in scan(text, name)]
    assert found == []


@pytest.mark.parametrize("snippet", [
    "import pickle\npickle.load(f)",
    "import pickle as p\np.loads(b)",
    "from pickle import loads\nloads(b)",
    "from pickle import Unpickler\nUnpickler(f).load()",
    "import _pickle\n_pickle.loads(b)",
    "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
    "import numpy\nnumpy.lib.format.read_array(f, allow_pickle=1)",
    "import torch\ntorch.load('w.pt')",
    "import torch\ntorch.load('w.pt', weights_only=False)",
    "import yaml\nyaml.load(text)",
    "import yaml\nyaml.load(text, Loader=yaml.Loader)",
    "import yaml\nyaml.unsafe_load(text)",
    "import joblib\njoblib.load('m.pkl')",
    "import pandas as pd\npd.read_pickle('f.pkl')",
    "import shelve\nshelve.open('db')",
    "import marshal\nmarshal.loads(b)",
    "import dill\ndill.load(f)",
    "import pickle\nclass U(pickle.Unpickler):\n    pass",
    "import pickle\nclass U(pickle.Unpickler):\n    def find_class(self, m, n):\n"
    "        return super().find_class(m, n)",
    "import pickle\nclass U(pickle.Unpickler):\n    def find_class(self, m, n):\n"
    "        if m == 'collections':\n            return dict\n        return super().find_class(m, n)\n"
    "    def other(self):\n        raise ValueError",
])
def test_the_scanner_catches_every_forbidden_form(snippet):
    assert scan(snippet), snippet


@pytest.mark.parametrize("snippet", [
    "import numpy as np\nnp.load('x.npy')",
    "import numpy as np\nnp.load('x.npy', allow_pickle=False)",
    "import yaml\nyaml.safe_load(text)",
    "import yaml\nyaml.load(text, Loader=yaml.SafeLoader)",
    "import json\njson.load(f)",
    "import mxnet as mx\nmx.nd.load('x.params')",
    "'''torch.load(f) would run code; pickle.loads too'''",
    "import pickle\nclass U(pickle.Unpickler):\n    def find_class(self, m, n):\n"
    "        if (m, n) == ('collections', 'OrderedDict'):\n            return dict\n"
    "        raise pickle.UnpicklingError(m)",
])
def test_the_scanner_allows_safe_forms(snippet):
    assert scan(snippet) == []


# --------------------------------------------------------------------------- the restricted unpickler
def _global_call(module, name, *args):
    """A protocol-0 pickle that calls module.name(*args) when unpickled (GLOBAL + REDUCE)."""
    body = b"".join(b"S'" + a.encode() + b"'\n" for a in args)
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n(" + body + b"tR."


class _Opener:
    """Pickles (protocol 4, STACK_GLOBAL) as a call of builtins.open(marker, 'w')."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def _payloads(marker):
    m = str(marker)
    return {
        "os.system": _global_call("os", "system", f"touch {m}"),
        "posix.system": _global_call("posix", "system", f"touch {m}"),
        "builtins.eval": _global_call("builtins", "eval", f"open({m!r}, 'w')"),
        "builtins.exec": _global_call("builtins", "exec", f"open({m!r}, 'w')"),
        "builtins.open": _global_call("builtins", "open", m, "w"),
        "builtins.getattr": _global_call("builtins", "getattr", "x", "y"),
        "builtins.__import__": _global_call("builtins", "__import__", "os"),
        "subprocess.Popen": _global_call("subprocess", "Popen", "true"),
        "torch.load": _global_call("torch", "load", m),
        "torch._utils._rebuild_device_tensor_from_numpy":
            _global_call("torch._utils", "_rebuild_device_tensor_from_numpy", m),
        "torch.serialization.load": _global_call("torch.serialization", "load", m),
        "open via STACK_GLOBAL": pickle.dumps(_Opener(m), protocol=4),
        "open via protocol 2": pickle.dumps(_Opener(m), protocol=2),
    }


def test_torch_reader_find_class_is_a_whitelist_that_refuses_code(tmp_path):
    from mxvision.errors import WeightsError
    from mxvision.io.torchfile.reader import RestrictedUnpickler, read_torch_pickle

    assert "find_class" in RestrictedUnpickler.__dict__
    marker = tmp_path / "pwned"
    for what, payload in _payloads(marker).items():
        # Straight through the unpickler ...
        with pytest.raises(WeightsError, match="refusing to load"):
            RestrictedUnpickler(io.BytesIO(payload), "payload", lambda *a: None).load()
        # ... and as a .pt file of either format (zip with data.pkl; legacy: the pickles directly).
        zipped = tmp_path / "evil.pt"
        with zipfile.ZipFile(zipped, "w") as zf:
            zf.writestr("archive/data.pkl", payload)
        legacy = tmp_path / "evil_legacy.pt"
        legacy.write_bytes(b"\x80\x02" + payload if not payload.startswith(b"\x80") else payload)
        for path in (zipped, legacy):
            with pytest.raises(WeightsError) as info:
                read_torch_pickle(path)
            assert str(info.value).startswith(str(path) + ": ") and "\n" not in str(info.value)
        assert not marker.exists(), f"{what} ran"


def _trainer_state_loads():
    """Calls of Trainer.load_states in the package: MXNet unpickles the file (Updater.set_states)."""
    hits = []
    for name, text in _sources():
        for node in ast.walk(ast.parse(text, name)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "load_states":
                hits.append(f"{name}:{node.lineno}")
    return hits


def test_no_optimizer_state_is_unpickled():
    assert _trainer_state_loads() == []


def test_resuming_a_run_with_a_hostile_states_file_runs_no_code(small_store, tmp_path):
    from mxvision.train.loop import train_head

    run, marker = tmp_path / "run", tmp_path / "pwned"
    train_head(small_store, run, epochs=1, batch_size=8, ctx="cpu", progress=False)
    (run / "checkpoints" / "epoch-0001.states").write_bytes(pickle.dumps(_Opener(str(marker))))
    try:
        train_head(small_store, run, epochs=2, batch_size=8, ctx="cpu", progress=False)
    except Exception:  # noqa: BLE001 - whatever happens after, the file must not have run
        pass
    assert not marker.exists()
