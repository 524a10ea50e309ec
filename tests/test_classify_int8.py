"""``classify --dtype int8``: the INT8 network of a torchxrayvision port, used only when its
scores are measured to stay within the tolerance of float32 (mxvision.inference.int8_classifier).

Real films (JSRT to calibrate and check, the sample films to score), random mimic_nb weights with
outputs that do not saturate; the conversion is done once per session (the session's user cache).
"""
import numpy as np
import pytest
from support.xrv_files import DENSE
from support.xrv_int8 import int8_setup

from mxvision import cli
from mxvision.errors import MxvisionError
from mxvision.inference import classify


@pytest.fixture(scope="module")
def setup(shared, tmp_path_factory):
    return int8_setup(shared, tmp_path_factory.mktemp("int8"))


def _int8(setup, paths, tolerance=1.0, **options):
    return classify(paths, model=DENSE, weights=setup["weights"], dtype="int8", batch_size=4,
                    calibration=str(setup["calibration"]), int8_tolerance=tolerance, **options)


def _largest_difference(setup, **options):
    """Recomputed: float32 against INT8 scores on the held-out (odd-numbered) calibration films."""
    held_out = setup["films"][1::2]
    a = classify(held_out, model=DENSE, weights=setup["weights"], batch_size=4, **options)
    b = _int8(setup, held_out, **options)
    available = [k for k, v in a[0]["scores"].items() if v is not None]
    return max(abs(x["scores"][k] - y["scores"][k]) for x, y in zip(a, b) for k in available)


def test_int8_scores_come_from_the_converted_network_and_its_check_is_what_it_says(setup):
    int8 = _int8(setup, setup["samples"])
    fp32 = classify(setup["samples"], model=DENSE, weights=setup["weights"], batch_size=4)
    check = int8[0]["int8"]
    assert [r["dtype"] for r in int8] == ["int8", "int8"] and fp32[0]["dtype"] == "float32"
    assert check["films"] == 4 and check["calibration"]["n_images"] == 4 and check["tolerance"] == 1.0
    assert check["calibration"]["relu_unfused"] == 0  # DenseNet has no convolution with a residual sum
    assert _int8(setup, setup["samples"][:1])[0]["int8"]["cache"] == "hit"  # converted once
    # the check's figure is the largest difference on the odd-numbered calibration films
    worst = _largest_difference(setup)
    assert check["max_score_difference"] == pytest.approx(worst, abs=1e-6) and worst > 0
    # INT8 scores: not float32's, but close; unavailable outputs stay unavailable
    for x, y in zip(fp32, int8):
        assert x["unavailable"] == y["unavailable"] and y["scores"]["Infiltration"] is None
        got, want = np.array(y["outputs"]), np.array(x["outputs"])
        assert not np.allclose(got, want, atol=1e-6) and np.abs(got - want).max() < 0.5


def test_each_way_of_scoring_is_checked_for_itself(setup):
    """One converted network (it ends at the logits), but a check per scoring: op_norm stretches
    differences below a threshold, so the sigmoid's check says nothing about calibrated scores."""
    calibrated = _int8(setup, setup["samples"][:1])[0]["int8"]
    sigmoid = _int8(setup, setup["samples"][:1], calibrated=False)[0]
    assert sigmoid["calibrated"] is False and sigmoid["int8"]["key"] == calibrated["key"]
    assert sigmoid["int8"]["max_score_difference"] == pytest.approx(_largest_difference(setup, calibrated=False),
                                                                    abs=1e-6)
    assert sigmoid["int8"]["max_score_difference"] != pytest.approx(calibrated["max_score_difference"], abs=1e-4)


def test_int8_beyond_the_tolerance_is_refused_in_one_line(setup, capsys):
    worst = _int8(setup, setup["samples"][:1])[0]["int8"]["max_score_difference"]
    tolerance = worst / 2
    with pytest.raises(MxvisionError, match=r"differ from float32 by up to %.3f on 4 held-out" % worst):
        _int8(setup, setup["samples"][:1], tolerance=tolerance)
    code = cli.main(["classify", setup["samples"][0], "--model", DENSE, "--weights", setup["weights"],
                     "--dtype", "int8", "--calibration", str(setup["calibration"]),
                     "--int8-tolerance", "%g" % tolerance, "--quiet"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mxvision: error")]
    assert code != 0 and len(err) == 1 and "--int8-tolerance %g; score in float32" % tolerance in err[0]


def test_int8_passes_its_check_into_the_table(setup, capsys):
    assert cli.main(["classify", setup["samples"][1], "--model", DENSE, "--weights", setup["weights"],
                     "--dtype", "int8", "--calibration", str(setup["calibration"]),
                     "--int8-tolerance", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    worst = _int8(setup, setup["samples"][:1])[0]["int8"]["max_score_difference"]
    assert ", INT8 (within %.3f of float32 on 4 held-out calibration films)" % worst in out.splitlines()[0]


@pytest.mark.parametrize("extra, problem", [
    ([], "--dtype int8: needs --calibration"),
    (["--calibration", "FEW"], "holds 3 film(s); INT8 needs at least 4"),
    (["--calibration", "BROKEN"], "a film cannot be read"),
])
def test_int8_without_enough_readable_films_is_one_line(setup, tmp_path, capsys, extra, problem):
    few = tmp_path / "few"
    few.mkdir()
    for film in setup["films"][:3]:
        (few / film.rsplit("/", 1)[1]).symlink_to(film)
    broken = tmp_path / "broken"
    broken.mkdir()
    for film in setup["films"][:4]:
        (broken / film.rsplit("/", 1)[1]).symlink_to(film)
    first = setup["films"][0].rsplit("/", 1)[1]  # the broken one sorts second: a checked film
    (broken / first.replace(".png", "_broken.png")).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    extra = [{"FEW": str(few), "BROKEN": str(broken)}.get(e, e) for e in extra]
    code = cli.main(["classify", setup["samples"][0], "--model", DENSE, "--weights", setup["weights"],
                     "--dtype", "int8", *extra, "--quiet"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mxvision: error")]
    assert code != 0 and len(err) == 1 and problem in err[0]


@pytest.mark.parametrize("option", [["--calibration", "CAL"], ["--int8-tolerance", "0.1"]])
def test_int8_options_without_int8_are_refused(setup, capsys, option):
    option = [str(setup["calibration"]) if o == "CAL" else o for o in option]
    code = cli.main(["classify", setup["samples"][0], "--model", DENSE, "--weights", setup["weights"],
                     *option, "--quiet"])
    err = capsys.readouterr().err
    assert code != 0 and f"{option[0]}: is for --dtype int8" in err


@pytest.mark.parametrize("tolerance", [float("nan"), float("inf"), 0.0, -0.1, None, "0.02"])
def test_an_int8_tolerance_that_is_not_a_positive_number_is_one_line(setup, tolerance):
    with pytest.raises(MxvisionError, match="--int8-tolerance .*: must be a finite number above 0"):
        _int8(setup, setup["samples"][:1], tolerance=tolerance)
