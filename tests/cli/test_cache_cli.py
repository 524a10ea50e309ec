"""``mxvision cache list|clear`` through the real command line."""
import os
import pty
import subprocess
import sys

from mxvision.features import cache
from support.cache_entries import KEY, XRV_NAME, fill_cache
from support.cli import one_line_error, run_cli


def test_list_prints_one_line_per_entry_and_a_total(tmp_path, monkeypatch):
    monkeypatch.setenv("MXVISION_CACHE", str(tmp_path))
    fill_cache(tmp_path)
    code, out, err = run_cli("cache", "list")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert len(lines) == 5 and all(len(line.split("\t")) == 5 for line in lines[:4])
    kinds = [line.split("\t")[:2] for line in lines[:4]]
    assert kinds == [["quantized network", KEY], ["incomplete quantized network", "cd" * 20],
                     ["converted weights", XRV_NAME], ["downloaded weights", "resnet18_v2"]]
    network = lines[0].split("\t")
    assert network[2].endswith(" kB") and network[3] == "2026-12-06T01:02:03"
    assert "resnet50_v2 cut stage4_unit2_relu1" in network[4] and "preset imagenet224" in network[4] \
        and "on 64 images" in network[4]
    assert "torchxrayvision nih-pc-chex" in lines[2] and "(densenet121, 224 px)" in lines[2]
    assert lines[4].startswith("4 entries, ") and f"quantized in {tmp_path / 'quantized'}" in lines[4] \
        and f"weights in {tmp_path / 'models'}" in lines[4]
    code, out, _ = run_cli("cache", "list", "--weights")
    assert code == 0 and [line.split("\t")[1] for line in out.splitlines()[:-1]] == [XRV_NAME, "resnet18_v2"]


def test_clear_deletes_the_kind_asked_for_and_prints_what_was_freed(tmp_path, monkeypatch):
    monkeypatch.setenv("MXVISION_CACHE", str(tmp_path))
    made = fill_cache(tmp_path)
    sizes = {e.name: e.size for e in cache.list_entries()}
    code, out, err = run_cli("cache", "clear", "--yes")  # default: the quantized networks
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert [line.split("\t")[1] for line in lines[:-1]] == [KEY, "cd" * 20]
    assert lines[-1].startswith(f"freed {cache.human_size(sizes[KEY] + sizes['cd' * 20])}: 2 entries deleted")
    assert not os.path.exists(made["quantized"]) and os.path.exists(made["downloaded"])
    code, out, _ = run_cli("cache", "clear", "--all", "--yes")
    assert code == 0 and out.splitlines()[-1].startswith("freed ") and "2 entries deleted" in out
    assert os.listdir(tmp_path / "models") == ["notes.txt"]
    code, out, _ = run_cli("cache", "clear", "--weights", "--yes")
    assert code == 0 and out.startswith("nothing to delete (weights in ")


def _cli(args, env, **kw):
    return subprocess.run([sys.executable, "-m", "mxvision", *args], env=env, capture_output=True, text=True,
                          timeout=300, **kw)


def test_clear_asks_on_a_terminal_and_refuses_without_one(tmp_path):
    env = dict(os.environ, MXVISION_CACHE=str(tmp_path))
    made = fill_cache(tmp_path)
    r = _cli(["cache", "clear", "--all"], env, stdin=subprocess.DEVNULL)
    one_line_error(r.returncode, r.stderr, "cache clear: would delete 4 entries", "pass --yes")
    assert r.returncode == 2 and r.stdout == "" and os.path.exists(made["quantized"])

    def answered(answer):
        main, side = pty.openpty()
        try:
            os.write(main, answer)
            return _cli(["cache", "clear"], env, stdin=side)
        finally:
            os.close(main)
            os.close(side)

    r = answered(b"n\n")
    assert r.returncode == 0 and "nothing deleted" in r.stdout and os.path.exists(made["quantized"])
    r = answered(b"y\n")
    assert r.returncode == 0 and "freed " in r.stdout and not os.path.exists(made["quantized"])
    assert os.path.exists(made["downloaded"])


def test_bad_command_lines_and_unreadable_folders_are_one_line_errors(tmp_path, monkeypatch):
    for argv, fragment in [(["cache"], "ACTION"), (["cache", "list", "--quantized", "--weights"], "not allowed"),
                           (["cache", "clear", "--all", "--quantized"], "not allowed"),
                           (["cache", "purge"], "invalid choice")]:
        code, _, err = run_cli(*argv)
        one_line_error(code, err, fragment)
        assert code == 2
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("MXVISION_CACHE", str(blocker))
    code, out, err = run_cli("cache", "list")
    one_line_error(code, err, f"{blocker / 'quantized'}: cannot read the cache folder")
    assert code == 2 and out == "" and blocker.read_text() == "x"
