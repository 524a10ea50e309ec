"""Which entries of a folder are images: one rule for every command that lists a folder."""
from pathlib import Path

import pytest

from mxvision.data.folder import IMAGE_SUFFIXES, expand_images, image_names, index_from_folder, is_image_name

IMAGES = ["a.png", "b.TIF", "c.tiff", "d.jpg", "e.JPEG", "f.dcm", "g.dicom", "h.bmp"]
NOT_IMAGES = ["notes.txt", ".hidden.png", "._mac_companion.jpg", "no_suffix", "archive.png.gz"]


def _folder(root):
    root.mkdir(parents=True)
    for name in IMAGES + NOT_IMAGES:
        (root / name).write_bytes(b"content is checked when read, not when listed")
    (root / "sub").mkdir()
    return root


def test_image_names_take_every_image_suffix_in_any_case_and_skip_hidden_files(tmp_path):
    folder = _folder(tmp_path / "normal")
    assert image_names(folder) == IMAGES
    assert {s.lower() for s in IMAGE_SUFFIXES} >= {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom"}
    assert not any(is_image_name(n) for n in NOT_IMAGES)


def test_entries_are_taken_by_name_so_reading_reports_them(tmp_path):
    folder = tmp_path / "normal"
    folder.mkdir()
    (folder / "folder.png").mkdir()
    (folder / "broken.png").symlink_to(folder / "absent.png")
    assert image_names(folder) == ["broken.png", "folder.png"]


def test_index_folder_and_expansion_list_the_same_files(tmp_path):
    _folder(tmp_path / "xrays" / "normal")
    index = index_from_folder(tmp_path / "xrays")
    expanded = expand_images([tmp_path / "xrays" / "normal"])
    assert [Path(p).name for p in index.paths] == [p.name for p in expanded] == IMAGES


def test_expansion_keeps_files_in_order_and_paths_it_cannot_examine(tmp_path):
    folder = _folder(tmp_path / "normal")
    too_long = tmp_path / ("x" * 300 + ".png")  # stat fails with ENAMETOOLONG
    with pytest.raises(OSError, match="too long"):
        too_long.is_dir()
    given = [tmp_path / "z.png", too_long, folder, tmp_path / "missing.png"]
    assert expand_images(given) == [tmp_path / "z.png", too_long] + [folder / n for n in IMAGES] + \
        [tmp_path / "missing.png"]
    assert expand_images([str(folder)]) == [folder / n for n in IMAGES]  # str arguments too
