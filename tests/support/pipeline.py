"""The rest of the pipeline after extraction, as a user runs it: train a head, predict, export."""
from pathlib import Path

from mxvision.export import export_model
from mxvision.inference import predict
from mxvision.train.loop import train_head


def train_predict_export(store, tmp_path, epochs=1):
    """Train on ``store`` and check that the run predicts two of its images and exports."""
    train_head(store.path, tmp_path / "run", epochs=epochs, batch_size=8, ctx="cpu", progress=False,
               keep_checkpoints=0)
    images = [it["path"] for it in store.items[:2]]
    results = predict(tmp_path / "run", images, ctx="cpu")
    assert [r["path"] for r in results] == images and all("probabilities" in r for r in results)
    paths = export_model(tmp_path / "run", tmp_path / "exported", ctx="cpu")
    assert Path(paths["symbol"]).is_file()
    return results, paths
