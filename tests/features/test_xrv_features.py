"""A torchxrayvision model's features for transfer learning (mxvision.features.xrv), on real films.

The autoencoder resnet_ae-101-elastic with random, realistic weights (support.xrv_autoencoder),
written as its release file (a state dict in torch's names): an index of JSRT films gives a feature store that a training run
consumes; image files give an .npz of flattened latents equal to the model's own ``encode``.
"""

import mxnet as mx
import numpy as np
import pytest

from mxvision.data.xrv_transforms import XRayCenterCrop, XRayResizer, load_xray, preprocess
from mxvision.errors import MxvisionError, WeightsError
from mxvision.features import xrv
from support.jsrt_films import small_jsrt_index
from support.xrv_autoencoder import NAME, RELEASE_FILE, write_autoencoder_release

LATENT = (512, 3, 3)
SAMPLES = ["00000001_000.png", "16747_3_1.jpg", "Fake_MONOHR1.dcm"]


@pytest.fixture(scope="module")
def release(shared, tmp_path_factory):
    path = tmp_path_factory.mktemp("ae") / RELEASE_FILE
    films = [shared / "data" / "samples" / n for n in SAMPLES]
    return {"path": str(path), "net": write_autoencoder_release(path, films)}


def test_index_gives_a_feature_store_a_training_run_consumes(shared, release, tmp_path):
    from mxvision.train.loop import train_head

    index = small_jsrt_index(shared, tmp_path / "jsrt.csv")
    store = xrv.extract_xrv_features(index, tmp_path / "store", weights=release["path"], batch_size=4,
                                     progress=False)
    m = store.manifest
    assert (m["backbone"], m["cut"], tuple(m["feature_shape"]), m["n_features"]) == (NAME, "features", LATENT, 12)
    assert m["preprocessing"]["name"] == "xrv224" and m["weights"]["file"] == release["path"]
    feats, labels, ids = store.load()
    assert feats.shape == (12,) + LATENT and sorted(set(labels)) == [0, 1] and np.isfinite(feats).all()
    # the pipeline's xrv224 preset: the model card's crop, then OpenCV's INTER_AREA resize
    # (torchxrayvision's XRayResizer(engine="cv2")), not its default scikit-image one
    film = XRayCenterCrop()(load_xray(shared / "data" / "jsrt" / "images" / "JPCLN003.png"))
    z = release["net"].encode(mx.nd.array(XRayResizer(224, engine="cv2")(film)[None])).asnumpy()[0]
    assert np.abs(feats[[k for k, i in enumerate(ids) if i.endswith("JPCLN003.png")][0]] - z).max() <= 1e-4 * np.abs(z).max()
    state = train_head(store, tmp_path / "run", epochs=2, batch_size=4, progress=False, keep_checkpoints=0)
    assert (tmp_path / "run" / "best.params").is_file() and [r["epoch"] for r in state["history"]] == [1, 2]


def test_image_files_give_an_npz_of_flat_latents(shared, release, tmp_path):
    films = [str(shared / "data" / "samples" / n) for n in SAMPLES]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    results, info = xrv.encode_images(films + [str(broken)], weights=release["path"], batch_size=2)
    assert [r["path"] for r in results] == films + [str(broken)] and "error" in results[-1]
    assert info["feature_shape"] == list(LATENT) and info["model"] == NAME
    path = xrv.write_features_npz(results, info, tmp_path / "ae.npz")
    with np.load(path, allow_pickle=False) as npz:
        assert list(npz["paths"]) == films and tuple(npz["feature_shape"]) == LATENT
        features = npz["features"]
    assert features.shape == (3, int(np.prod(LATENT))) and features.dtype == np.float32
    x = mx.nd.array(np.stack([preprocess(load_xray(f), 224) for f in films]))
    z = release["net"].encode(x).asnumpy().reshape(3, -1)
    assert np.abs(features - z).max() <= 1e-5 * np.abs(z).max()
    with pytest.raises(Exception, match="broken.png"):
        xrv.encode_images([str(broken)], weights=release["path"], strict=True)


def test_bad_inputs_are_refused_in_one_line(release, tmp_path):
    for model, why in (("riken-age", "not a torchxrayvision model with features"),
                       ("resnet50_v2", "other networks: mxvision extract"), ("nope", "known: .*" + NAME)):
        with pytest.raises(MxvisionError, match=why) as err:
            xrv.check_features_model(model)
        assert "\n" not in str(err.value)
    with pytest.raises(WeightsError, match="no such weights file"):
        xrv.resolve_weights_file(NAME, str(tmp_path / "absent.pt"))
    results = [{"path": "a.png", "features": np.zeros(4, np.float32)}]
    info = {"model": NAME, "feature_shape": [4], "weights": "w"}
    with pytest.raises(MxvisionError, match="name the .npz file"):
        xrv.write_features_npz(results, info, tmp_path / "features.csv")
    (tmp_path / "dir.npz").mkdir()
    with pytest.raises(MxvisionError, match="is a folder"):
        xrv.write_features_npz(results, info, tmp_path / "dir.npz")
    with pytest.raises(MxvisionError, match="no film could be read"):
        xrv.write_features_npz([{"path": "a.png", "error": "unreadable"}], info, tmp_path / "none.npz")
    assert not (tmp_path / "none.npz").exists()
