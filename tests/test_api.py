"""The public API: ``import mxvision as mxv`` is cheap, and each name is the object at its home."""
import importlib
import subprocess
import sys

from pathlib import Path

import pytest

import mxvision

# Where each public name is documented to live (README, CONTRIBUTING.md).
DOCUMENTED_HOMES = {
    "read_image": "mxvision.io.images",
    "read_index": "mxvision.data.index",
    "write_index": "mxvision.data.index",
    "XrayDataset": "mxvision.data.dataset",
    "make_synthetic_dataset": "mxvision.data.synth",
    "get_preset": "mxvision.data.transforms",
    "load_image": "mxvision.data.transforms",
    "load_batch": "mxvision.data.transforms",
    "get_model": "mxvision.models.zoo",
    "list_models": "mxvision.models.zoo",
    "build_backbone": "mxvision.models.zoo",
    "extract_features": "mxvision.features.extract",
    "FeatureStore": "mxvision.features.store",
    "train_head": "mxvision.train.loop",
    "finetune_run": "mxvision.train.finetune",
    "evaluate_run": "mxvision.evaluate",
    "predict": "mxvision.inference",
    "load_classifier": "mxvision.train.loop",
    "export_model": "mxvision.export",
    "load_exported": "mxvision.export",
    "classify": "mxvision.inference",
    "run_demo": "mxvision.demo",
    "explainer_from_run": "mxvision.audit.explain",
    "explainer_from_xrv": "mxvision.audit.explain",
    "shortcut_audit": "mxvision.audit.shortcuts",
    "make_lesion_pairs": "mxvision.audit.lesion",
    "MxvisionError": "mxvision.errors",
    "BadImage": "mxvision.errors",
    "BadIndex": "mxvision.errors",
    "DownloadError": "mxvision.errors",
    "WeightsError": "mxvision.errors",
    "BadRun": "mxvision.errors",
}
HEAVY = ("mxnet", "gluoncv", "cv2", "sklearn", "matplotlib", "onnx", "pydicom")


def run_python(code):
    """Run ``code`` in a fresh interpreter: what a first ``import mxvision`` loads is per process."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_import_mxvision_loads_nothing_heavy():
    out = run_python(
        "import sys, mxvision as mxv\n"
        "mxv.MxvisionError, mxv.BadImage, mxv.__version__, dir(mxv)\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))\n"
    )
    assert out.strip() == "[]", f"import mxvision imported {out.strip()}"


def test_getting_get_model_imports_no_mxnet():
    # Issue 13's check, verbatim: the registry is reachable without paying for MXNet, which the
    # families load when a model is built.
    run_python("import mxvision as mxv, sys; mxv.get_model; assert 'mxnet' not in sys.modules")


def test_public_api_is_the_documented_list():
    assert sorted(mxvision.__all__) == sorted(DOCUMENTED_HOMES)
    assert len(set(mxvision.__all__)) == len(mxvision.__all__)


@pytest.mark.parametrize("name", sorted(DOCUMENTED_HOMES))
def test_public_name_is_the_object_at_its_home(name):
    home = importlib.import_module(DOCUMENTED_HOMES[name])
    assert getattr(mxvision, name) is getattr(home, name)


def test_public_name_loads_its_module_on_first_use():
    out = run_python(
        "import sys, mxvision as mxv\n"
        "before = 'mxvision.features.extract' in sys.modules\n"
        "mxv.extract_features\n"
        "print(before, 'mxvision.features.extract' in sys.modules)\n"
    )
    assert out.split() == ["False", "True"]


def test_no_module_shadows_a_public_name():
    # A submodule named like a public function would rebind mxv.NAME to the module once imported.
    package = Path(mxvision.__file__).parent
    modules = {p.stem for p in package.glob("*.py")} | {p.name for p in package.iterdir() if p.is_dir()}
    assert not modules & set(mxvision.__all__), modules & set(mxvision.__all__)


def test_unknown_name_raises_attribute_error_naming_it():
    with pytest.raises(AttributeError, match="no_such_function"):
        getattr(mxvision, "no_such_function")
    with pytest.raises(ImportError, match="no_such_function"):
        exec("from mxvision import no_such_function", {})


def test_dir_lists_the_api_before_it_is_loaded():
    out = run_python("import mxvision as mxv\nprint(' '.join(dir(mxv)))\n")
    listed = out.split()
    assert set(mxvision.__all__) <= set(listed), set(mxvision.__all__) - set(listed)
    assert "__version__" in listed
