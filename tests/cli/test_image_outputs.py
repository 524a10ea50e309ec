"""Commands that take images: nothing to read is an error, and their output survives any file name.

An empty folder (or one named like an image) given to ``predict``, ``explain``, ``classify``,
``detector score`` or ``extract`` is one ``mxvision: error:`` line and exit 2, not an empty
success. File names holding a tab, a newline, a backslash or a byte that is not UTF-8 leave
``predict``'s TSV one line per image (escaped as its --help says) and its ``--json`` valid.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from support.cli import run_cli
from mxvision.cli.output import print_json, tsv_field
from mxvision.data.index import read_index

#: Names that break naive line- or tab-based output; the last one is not UTF-8.
ODD_NAMES = [b"tab\there.png", b"new\nline.png", b"back\\slash.png", b"carriage\rreturn.png",
             b"latin1-\xe9.png"]


def unescape(field):
    """The inverse of the TSV escaping documented in ``predict --help``."""
    def one(m):
        code = m.group(1)
        if code.startswith("x"):
            return chr(0xDC00 + int(code[1:], 16))  # the byte, as os.fsdecode keeps it
        return {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}[code]
    return re.sub(r"\\(\\|t|n|r|x[0-9a-f]{2})", one, field)


@pytest.fixture(scope="module")
def odd_files(synth_index, tmp_path_factory):
    """Copies of one real radiograph under each of :data:`ODD_NAMES`, as str paths."""
    folder = tmp_path_factory.mktemp("odd")
    source = read_index(synth_index).paths[0]
    paths = []
    for name in ODD_NAMES:
        target = os.path.join(os.fsencode(folder), name)
        shutil.copyfile(source, target)
        paths.append(os.fsdecode(target))
    return folder, paths


@pytest.mark.parametrize("name", ["empty", "folder.png"])
@pytest.mark.parametrize("command", [["predict", "--run", "{run}"], ["explain", "--run", "{run}"],
                                     ["classify", "--quiet"], ["detector", "score", "--run", "{run}"]])
def test_a_folder_without_images_is_one_line_and_exit_2(command, name, small_run, tmp_path):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image")
    argv = [a.replace("{run}", str(small_run)) for a in command] + [folder]
    code, out, err = run_cli(*argv, "--out", tmp_path / "out") if command[0] == "explain" else run_cli(*argv)
    assert code == 2 and "Traceback" not in err, err
    assert err.count("\n") == 1 and err.startswith(f"mxvision: error: no images found in {folder}"), err
    assert ("named like an image" in err) == name.endswith(".png")
    assert sorted(os.listdir(tmp_path)) == [name]  # no output folder


def test_extract_from_an_empty_folder_is_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "classes").mkdir()
    code, out, err = run_cli("extract", "--index", tmp_path / "classes", "--out", tmp_path / "f",
                             "--backbone", "resnet18_v2", "--weights", "none", "--quiet")
    assert code == 2 and err.count("\n") == 1 and "classes" in err and "Traceback" not in err, err
    (tmp_path / "classes" / "normal").mkdir()
    code, out, err = run_cli("extract", "--index", tmp_path / "classes", "--out", tmp_path / "f",
                             "--backbone", "resnet18_v2", "--weights", "none", "--quiet")
    assert code == 2 and err.count("\n") == 1 and "has no images" in err, err
    assert sorted(os.listdir(tmp_path)) == ["classes"]


def test_predict_tsv_is_one_escaped_line_per_image_whatever_the_names(small_run, odd_files):
    folder, paths = odd_files
    # A real process: its stdout encodes to UTF-8 strictly, as a terminal or a pipe does.
    proc = subprocess.run([sys.executable, "-m", "mxvision", "predict", "--run", str(small_run),
                           "--ctx", "cpu", os.fsdecode(folder)],
                          capture_output=True, timeout=300, env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    lines = proc.stdout.decode("utf-8").split("\n")
    assert lines[-1] == "" and len(lines) - 1 == len(paths)
    fields = [line.split("\t") for line in lines[:-1]]
    assert all(len(f) == 3 for f in fields), lines
    assert sorted(unescape(f[0]) for f in fields) == sorted(paths)
    classes = set(json.loads((small_run / "config.json").read_text())["features"]["classes"])
    assert all(f[1] in classes for f in fields)


def test_predict_json_is_valid_whatever_the_names(small_run, odd_files):
    folder, paths = odd_files
    code, out, err = run_cli("predict", "--run", small_run, "--ctx", "cpu", "--json", *paths)
    assert code == 0, err
    results = json.loads(out)
    assert [r["path"] for r in results] == paths
    assert out.isascii()  # any name survives any output encoding


def test_explain_tsv_escapes_the_names(small_run, odd_files, tmp_path):
    _, paths = odd_files
    code, out, err = run_cli("explain", "--run", small_run, "--ctx", "cpu", "--out", tmp_path, paths[0], paths[1])
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("model: ") and len(lines) == 3
    assert [unescape(line.split("\t")[0]) for line in lines[1:]] == paths[:2]
    assert all(len(line.split("\t")) == 3 for line in lines[1:])


def test_tsv_field_and_json_output_cover_every_special_character(capsys):
    text = "a\\b\tc\nd\re" + b"\xff".decode("utf-8", "surrogateescape")
    field = tsv_field(text)
    assert field == "a\\\\b\\tc\\nd\\re\\xff" and unescape(field) == text
    print_json({"path": text, "score": float("nan"), "scores": [float("inf"), 0.5]})
    parsed = json.loads(capsys.readouterr().out)
    assert parsed == {"path": text, "score": None, "scores": [None, 0.5]}


TERMINAL_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def test_file_names_cannot_drive_the_terminal_or_split_records(small_run, small_store, tmp_path):
    """A name holding ESC/BEL (`esc]0;TITLE BEL`, `ESC[2J`: retitle and clear the terminal) was
    printed raw in the error line and the TSV; U+2028 and friends split TSV records for
    str.splitlines. Both now come out as visible escapes."""
    hostile = tmp_path / "esc\x1b]0;PWNED\x07\x1b[2Jx.png"
    hostile.write_text("junk")
    code, out, err = run_cli("predict", "--run", small_run, "--strict", hostile)
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not TERMINAL_CONTROLS.search(err), repr(err)
    assert "esc\\x1b]0;PWNED\\x07\\x1b[2Jx.png" in err
    good = small_store.items[0]["path"]
    named = []
    for k, sep in enumerate(["\x0b", "\x0c", "\x85", "\u2028", "\x1b"]):
        path = tmp_path / f"n{k}{sep}x.png"
        shutil.copy(good, path)
        named.append(path)
    code, out, err = run_cli("predict", "--run", small_run, *named)
    assert code == 0, err
    assert not TERMINAL_CONTROLS.search(out), repr(out)
    rows = [line for line in out.splitlines() if line.strip()]
    assert len([r for r in rows if "\\u2028" in r or "\\x0b" in r or "\\x0c" in r or "\\x85" in r
                or "\\x1b" in r]) == len(named), rows
