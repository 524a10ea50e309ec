"""Every option of every command refuses a bad value while parsing, with one line and exit 2.

Generated from the parser itself (``mxvision.cli.build_parser``): the commands are found by
walking its sub-parsers, the options by reading each command's actions, and the other arguments a
command requires are filled with values its own ``type`` functions accept. An option added later
is covered without editing this file. Whether a value such as ``0`` is valid is the option's
``type`` function's business; what is checked here is that every value is either accepted or
refused with exactly one ``mxvision: error:`` line naming the option, exit status 2, no traceback
and nothing written -- and that NaN, infinities and text are never accepted by a numeric option.
Parsing only (fast); a few refusals also run end to end through the real CLI.
"""
import argparse
import contextlib
import io
import os

import pytest

from support.cli import run_cli
from mxvision import cli
from mxvision.cli import common

PARSER = cli.build_parser()
#: Values every option is tried with.
TRIED = ["0", "-1", "-3", "2.5", "nan", "NaN", "inf", "-inf", "1e400", "-1e400", str(10 ** 30),
         "1e30", "abc", "", " "]
#: Of those, what no numeric option may accept.
NEVER_NUMERIC = ["nan", "NaN", "inf", "-inf", "1e400", "-1e400", "abc", "", " "]
#: Candidate values for the arguments a command requires besides the one under test; the first
#: one the argument's own type accepts is used.
CANDIDATES = ["1", "2", "0.5", "0", "0" * 40, "0" * 64]


def commands(parser, prefix=()):
    """(command words, parser) of every leaf command, e.g. (("data", "index", "jsrt"), parser)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix, parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from commands(sub, prefix + (name,))


COMMANDS = dict((" ".join(words), (words, parser)) for words, parser in commands(PARSER))


def value_arguments(parser):
    """The actions of a command that take values (not --help, flags or sub-commands)."""
    return [a for a in parser._actions if a.nargs != 0 and a.dest != "help"
            and not isinstance(a, argparse._SubParsersAction)]


def is_numeric(action):
    return isinstance(action.type, common.Number) or action.type in (int, float)


def option_name(action):
    return max(action.option_strings, key=len)


def count(action):
    """How many values to give the action."""
    return action.nargs if isinstance(action.nargs, int) else 1


def accepts(action, text):
    if action.choices is not None:
        return text in [str(c) for c in action.choices]
    try:
        (action.type or str)(text)
    except (argparse.ArgumentTypeError, TypeError, ValueError):
        return False
    return True


def plausible(action, folder):
    """A value the action's own type accepts: a choice, a path under ``folder`` or a number."""
    if action.choices is not None:
        return str(next(iter(action.choices)))
    for text in [str(folder / action.dest)] + CANDIDATES:
        if accepts(action, text):
            return text
    raise AssertionError(f"cannot derive a value for {action.dest}: extend CANDIDATES")


def required_argv(parser, folder, leave_out=None):
    """The command's required options and positionals, filled with plausible values."""
    options, positionals = [], []
    for action in value_arguments(parser):
        if action is leave_out:
            continue
        if action.option_strings and action.required:
            options += [option_name(action)] + [plausible(action, folder)] * count(action)
        elif not action.option_strings and action.nargs not in ("*", "?", argparse.REMAINDER):
            positionals += [plausible(action, folder)] * count(action)
    return options, positionals


def parse(argv):
    """(exit code, stderr) of parsing ``argv`` and running the post-parse checks; 0 = accepted."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            common.parse_arguments(PARSER, list(argv))
            code = 0
        except SystemExit as exc:
            code = exc.code
    return code, err.getvalue()


def assert_refused(code, err, option, value=None):
    assert code == 2, (option, value, code, err)
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mxvision: error: "), err
    assert option in lines[0], lines[0]
    if value is not None and "expected" not in lines[0]:  # "-inf" reads as an option: "expected one argument"
        assert common.shown_value(value) in lines[0], lines[0]


def options_of(kind):
    """(command, action) of every option of ``kind``: "numeric" or "choices"."""
    found = []
    for name, (_, parser) in COMMANDS.items():
        for action in value_arguments(parser):
            if action.option_strings and (is_numeric(action) if kind == "numeric" else
                                          action.choices is not None):
                found.append(pytest.param(name, action, id=f"{name} {option_name(action)}"))
    return found


def test_the_walk_finds_every_command_and_many_options():
    assert {"demo", "extract", "train", "predict", "data index jsrt", "data download url",
            "audit", "synth", "detector train", "cluster local", "cluster train"} <= set(COMMANDS)
    assert len(options_of("numeric")) > 60 and len(options_of("choices")) > 10


def test_every_numeric_option_has_a_checked_type():
    """A bare ``type=int``/``float`` would accept 0, -1, NaN and inf: every number goes through
    a range-checked type of mxvision.cli.common."""
    bare = [f"{name} {option_name(a)}" for name, (_, p) in COMMANDS.items() for a in value_arguments(p)
            if a.option_strings and a.type in (int, float)]
    assert not bare


@pytest.mark.parametrize("command, action", options_of("numeric"))
def test_numeric_options_accept_or_refuse_in_one_line(command, action, tmp_path):
    words, parser = COMMANDS[command]
    options, positionals = required_argv(parser, tmp_path, leave_out=action)
    option = option_name(action)
    for value in TRIED:
        code, err = parse([*words, option, *[value] * count(action), *options, *positionals])
        if code == 0 and value not in NEVER_NUMERIC:
            assert err == ""
            continue
        assert value not in NEVER_NUMERIC or code != 0, f"{command} {option} accepted {value!r}"
        assert_refused(code, err, option, value)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("command, action", options_of("choices"))
def test_choice_options_refuse_other_values(command, action, tmp_path):
    words, parser = COMMANDS[command]
    options, positionals = required_argv(parser, tmp_path, leave_out=action)
    option = option_name(action)
    for value in ["not-a-choice", "", "0"]:
        if accepts(action, value):
            continue
        code, err = parse([*words, option, *[value] * count(action), *options, *positionals])
        assert_refused(code, err, option)
    assert os.listdir(tmp_path) == []


def test_every_command_line_the_test_builds_is_accepted(tmp_path):
    """The filled-in command lines are valid, so a refusal above is the tried value's doing."""
    for name, (words, parser) in COMMANDS.items():
        options, positionals = required_argv(parser, tmp_path)
        code, err = parse([*words, *options, *positionals])
        assert code == 0, (name, err)


def test_a_range_whose_low_end_is_above_its_high_end_is_refused(tmp_path):
    ranges = [(name, a) for name, (_, p) in COMMANDS.items() for a in value_arguments(p)
              if a.option_strings and a.nargs == 2 and is_numeric(a)]
    assert {name for name, _ in ranges} >= {"synth", "detector train"}
    for name, action in ranges:
        words, parser = COMMANDS[name]
        options, positionals = required_argv(parser, tmp_path, leave_out=action)
        low, high = [v for v in CANDIDATES if accepts(action, v)][:2]
        assert float(low) < float(high)
        code, err = parse([*words, option_name(action), low, high, *options, *positionals])
        assert code == 0, err
        code, err = parse([*words, option_name(action), high, low, *options, *positionals])
        assert_refused(code, err, option_name(action))


def test_split_fractions_must_leave_a_training_split(tmp_path):
    split_commands = [name for name, (_, p) in COMMANDS.items()
                      if {"val", "test"} <= {a.dest for a in p._actions}]
    assert {"data index jsrt", "data index nih", "data index openi"} <= set(split_commands)
    for name in split_commands:
        words, parser = COMMANDS[name]
        options, positionals = required_argv(parser, tmp_path)
        code, err = parse([*words, "--val", "0.6", "--test", "0.6", *options, *positionals])
        assert_refused(code, err, "--val 0.6 --test 0.6")
        assert parse([*words, "--val", "0.5", "--test", "0.4", *options, *positionals])[0] == 0


def test_argparse_errors_are_one_line_without_the_usage_block():
    for argv in [[], ["bogus"], ["train"], ["data", "index"], ["extract", "--no-such-option"]]:
        code, err = parse(argv)
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith("mxvision: error: "), err
        assert "usage:" not in err


def test_the_cli_batch_minimum_is_the_training_loops():
    from mxvision.demo import MIN_PER_CLASS
    from mxvision.cli.pipeline import DEMO_MIN_PER_CLASS
    from mxvision.train.loop import MIN_BATCH

    assert common.MIN_TRAIN_BATCH == MIN_BATCH and DEMO_MIN_PER_CLASS == MIN_PER_CLASS


@pytest.mark.parametrize("argv, message", [
    (["extract", "--index", "{t}/i.csv", "--out", "{t}/f", "--batch-size", "0"],
     "--batch-size 0: must be a positive integer"),
    (["extract", "--index", "{t}/i.csv", "--out", "{t}/f", "--shard-size", "-3"], "--shard-size -3"),
    (["train", "--features", "{t}/f", "--out", "{t}/run", "--epochs", "0"], "--epochs 0"),
    (["train", "--features", "{t}/f", "--out", "{t}/run", "--batch-size", "1"], "--batch-size 1"),
    (["train", "--features", "{t}/f", "--out", "{t}/run", "--lr", "nan"], "--lr nan"),
    (["train", "--features", "{t}/f", "--out", "{t}/run", "--lr", "-5"], "--lr -5"),
    (["data", "index", "jsrt", "--root", "{t}", "--out", "{t}/j.csv", "--val", "2.0"], "--val 2.0"),
    (["data", "index", "jsrt", "--root", "{t}", "--out", "{t}/j.csv", "--val", "0.6", "--test", "0.6"],
     "--val 0.6 --test 0.6"),
    (["audit", "--index", "{t}/i.csv", "--cv", "1", "--out", "{t}/a.json"], "--cv 1"),
    (["synth", "--index", "{t}/i.csv", "--out", "{t}/s", "--radius", "20", "7"], "--radius 20 7"),
    (["synth", "--index", "{t}/i.csv", "--out", "{t}/s", "--variants", "0"], "--variants 0"),
    (["demo", "--out", "{t}/demo", "--n-per-class", "0"], "--n-per-class 0"),
    (["data", "download", "url", "http://127.0.0.1:9/x", "--out", "{t}/x", "--sha256", "xyz"], "--sha256 xyz"),
    (["data", "download", "url", "http://127.0.0.1:9/x", "--out", "{t}/x", "--retries", "-1"], "--retries -1"),
    (["data", "scrape", "openi", "--out", "{t}/o", "--page-size", "0"], "--page-size 0"),
    (["predict", "--run", "{t}/run", "{t}/x.png", "--ctx", "gpu:x"], "--ctx gpu:x"),
    (["train", "--features", "", "--out", "{t}/run"], "--features '': must not be empty"),
])
def test_the_real_cli_refuses_in_one_line_and_creates_nothing(argv, message, tmp_path):
    code, out, err = run_cli(*[a.replace("{t}", str(tmp_path)) for a in argv])
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and err.startswith("mxvision: error: ") and message in err, err
    assert os.listdir(tmp_path) == []
