import pytest

from support.httpserver import http_server  # noqa: F401  (real HTTP server on 127.0.0.1)

from mxvision.runtime import shared_dir


@pytest.fixture(scope="session", autouse=True)
def private_user_cache(tmp_path_factory):
    """The whole session writes its caches (calibrated INT8 networks, converted and downloaded
    weights) into a temporary folder, never into the user's ~/.cache/mxvision or ~/.mxnet:
    MXVISION_CACHE is set for every test and every process a test starts. Tests of the default
    location unset it with monkeypatch."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MXVISION_CACHE", str(tmp_path_factory.mktemp("mxvision-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def shared():
    """The real-data folder ../shared; tests that need it skip with a reason when it is absent."""
    path = shared_dir()
    if path is None:
        pytest.skip("../shared (real data) is absent; set MXVISION_SHARED to run this test")
    return path


@pytest.fixture(scope="session")
def synth_index(tmp_path_factory):
    """A small deterministic synthetic dataset (index CSV with patient-grouped splits)."""
    from mxvision.data.synth import make_synthetic_dataset

    out = tmp_path_factory.mktemp("synth")
    return make_synthetic_dataset(out, n_per_class=12, size=128, seed=0)


@pytest.fixture(scope="session")
def small_store(synth_index, tmp_path_factory):
    """Features of the synthetic set from a random-weight ResNet-18 v2 trunk (fast on a CPU)."""
    from mxvision.features.extract import extract_features

    out = tmp_path_factory.mktemp("features")
    return extract_features(synth_index, out, backbone="resnet18_v2", weights="none",
                            ctx="cpu", batch_size=8, shard_size=8, progress=False)


@pytest.fixture(scope="session")
def small_run(small_store, tmp_path_factory):
    """A trained head (a few epochs) on the small feature store."""
    from mxvision.train.loop import train_head

    out = tmp_path_factory.mktemp("run")
    train_head(small_store, out, epochs=4, batch_size=8, ctx="cpu", progress=False, keep_checkpoints=0)
    return out
