"""mxvision.runtime.user_cache_dir: $MXVISION_CACHE, else the platform's user cache folder."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mxvision.runtime import user_cache_dir


def test_the_default_is_the_xdg_cache_folder_and_mxvision_cache_overrides(monkeypatch, tmp_path):
    monkeypatch.delenv("MXVISION_CACHE")  # set for the whole session by tests/conftest.py
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_dir() == tmp_path / "xdg" / "mxvision"
    if sys.platform.startswith("linux"):
        monkeypatch.delenv("XDG_CACHE_HOME")
        assert user_cache_dir() == Path.home() / ".cache" / "mxvision"
    monkeypatch.setenv("MXVISION_CACHE", str(tmp_path / "mine"))
    assert user_cache_dir() == tmp_path / "mine"
    monkeypatch.setenv("MXVISION_CACHE", "")  # empty: as if unset
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_dir() == tmp_path / "xdg" / "mxvision"
    assert not (tmp_path / "xdg").exists()  # naming the folder creates nothing


def test_the_test_session_never_uses_the_real_user_cache():
    """tests/conftest.py points MXVISION_CACHE at a temporary folder for every test and every
    process a test starts: no test writes into ~/.cache/mxvision or ~/.mxnet."""
    cache = Path(os.environ["MXVISION_CACHE"])
    assert Path.home() / ".cache" not in [cache, *cache.parents] and ".mxnet" not in cache.parts
    child = subprocess.run([sys.executable, "-c", "from mxvision.runtime import user_cache_dir as u; print(u())"],
                           capture_output=True, text=True, check=True)
    assert Path(child.stdout.strip()) == cache
