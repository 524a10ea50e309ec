"""Library plots must leave matplotlib's backend alone: `matplotlib.use("Agg")` inside
`plot_training_curve` / `plot_confusion_matrix` switched a running Jupyter kernel to Agg, so every
later plot of the notebook (notebooks/01_quickstart.ipynb) showed no image."""
import matplotlib
import numpy as np
import pytest
from matplotlib.figure import Figure

from mxvision.evaluate import plot_confusion_matrix, plot_roc_curve
from mxvision.train.loop import plot_training_curve

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def other_backend():
    """A backend that is not Agg (SVG: non-interactive, works headless), as Jupyter's inline
    backend is not; the previous one is restored afterwards."""
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    yield "svg"
    matplotlib.use(before)


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _open_pyplot_figures():
    import sys
    plt = sys.modules.get("matplotlib.pyplot")
    return plt.get_fignums() if plt else []


def test_plots_keep_the_backend_and_return_their_figures(other_backend, tmp_path):
    figures_before = _open_pyplot_figures()
    history = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e, "train_accuracy": 0.5 + e / 20,
                "val_accuracy": 0.5 + e / 30, "val_auc": 0.5 + e / 25} for e in range(1, 6)]
    curve = plot_training_curve(history, tmp_path / "curve.png", best_epoch=4)
    cm = plot_confusion_matrix([[5, 2], [1, 7]], ["normal", "nodule"], tmp_path / "cm.png", title="test")
    rs = np.random.RandomState(0)
    labels = rs.randint(0, 2, 40)
    roc = plot_roc_curve(labels, labels * 0.3 + rs.uniform(0, 1, 40), tmp_path / "roc.png", positive="nodule")

    assert matplotlib.get_backend() == other_backend
    assert _open_pyplot_figures() == figures_before  # nothing left open in pyplot's registry
    assert all(isinstance(f, Figure) for f in (curve, cm, roc))
    assert _png_size(tmp_path / "curve.png") == (1000, 400)
    assert _png_size(tmp_path / "cm.png") == _png_size(tmp_path / "roc.png") == (450, 400)
    assert [t.get_text() for t in curve.axes[0].get_legend().get_texts()][-1] == "best epoch 4"
    assert plot_training_curve([], tmp_path / "empty.png") is None
    assert not (tmp_path / "empty.png").exists()
