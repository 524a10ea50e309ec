"""Run the real ``mxvision`` command line in-process, unpatched, and check its one-line errors."""
import contextlib
import io

from mxvision import cli


def run_cli(*argv):
    """(exit code, stdout, stderr) of ``mxvision ARGV...`` through the real entry point."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as exc:  # argparse usage errors and --help
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def one_line_error(code, err, *fragments):
    """The command failed with exactly one ``mxvision: error:`` line holding every fragment."""
    assert code != 0
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("mxvision: error:")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
