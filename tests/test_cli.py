"""The `clakit` entry points: console script, `python -m clakit`, --help and --version."""

import subprocess
import sys

import clakit
from clakit.cli import main
from clakit.errors import ClakitError


def test_version_and_help_via_python_m():
    out = subprocess.run([sys.executable, "-m", "clakit", "--version"], capture_output=True, text=True, check=True)
    # was `clakit 0.1.0` alone: a bug report needs the libraries it ran on too
    import platform

    import torch
    import transformers

    python = platform.python_version()
    libraries = f"transformers {transformers.__version__}, torch {torch.__version__}, python {python}"
    assert out.stdout.strip() == f"clakit {clakit.__version__} ({libraries})"
    out = subprocess.run([sys.executable, "-m", "clakit", "--help"], capture_output=True, text=True, check=True)
    assert "usage: clakit" in out.stdout
    bare = subprocess.run([sys.executable, "-m", "clakit"], capture_output=True, text=True)  # before: help, exit 0
    assert (bare.returncode, bare.stdout) == (2, "") and bare.stderr.startswith("clakit: error: give a command (")
    assert bare.stderr.count("\n") == 1 and "convert, eval, report" in bare.stderr, bare.stderr


def test_clakit_error_becomes_one_line_and_exit_2(capsys, monkeypatch):
    def boom(_args):
        raise ClakitError("something is wrong; do this instead")

    monkeypatch.setattr("clakit.cli.COMMANDS", [lambda sub: sub.add_parser("boom").set_defaults(run=boom)])
    assert main(["boom"]) == 2
    err = capsys.readouterr().err
    assert err == "clakit: error: something is wrong; do this instead\n"


def test_abbreviated_flags_are_refused_not_guessed(capsys, tmp_path):
    """`--ov` taken as --overwrite, `--resum` as --resume: a typo acted upon; each command wants its full flags."""
    for argv, flag in [(["convert", "a", "b", "--ov"], "--ov"), (["uptrain", "r.yaml", "--resum"], "--resum"),
                       (["eval", "m", "-o", "r.json", "--seq", "32"], "--seq")]:  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("clakit: error: unrecognized argument") and flag in err and err.count("\n") == 1, err


def test_uptrains_flags_are_the_recipe_keys_that_say_what_a_run_may_read():
    """cli's flag -> key mapping for `clakit uptrain` is the recipe's table, inverted."""
    from clakit.cli import UPTRAIN_KEY_FLAGS
    from clakit.uptrain.recipe import MODEL_READ_FLAGS

    assert UPTRAIN_KEY_FLAGS == {flag: f"model.{key}" for key, flag in MODEL_READ_FLAGS.items()}


def test_uptrain_without_a_recipe_names_only_the_recipe_as_required(capsys):
    """The overrides are optional, but argparse listed them: "the following arguments are required: recipe,
    key=value"."""
    assert main(["uptrain"]) == 2
    err = capsys.readouterr().err
    assert "the following arguments are required: recipe;" in err and "key=value" not in err, err


def test_a_removed_working_directory_is_one_line_not_a_traceback(tmp_path):
    """transformers resolves a path against the working directory when imported: in a folder removed since every
    command, `clakit --help` too, was a FileNotFoundError traceback (exit 1)."""
    import subprocess
    import sys

    gone = tmp_path / "gone"
    gone.mkdir()
    script = f'cd "{gone}" && rmdir "{gone}" && exec "{sys.executable}" -m clakit --help'
    proc = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = "clakit: error: the working directory no longer exists (removed since); cd into an existing folder and "
    assert proc.stderr.strip() == line + "run again"


def test_help_after_the_recipe_is_the_uptrain_help(capsys):
    """`clakit uptrain RECIPE --help` (a habit: the flag after the arguments) was refused as "unrecognized argument
    '--help'"; a recipe that does not exist is not looked at."""
    for argv in (["no/such.yaml", "--help"], ["no/such.yaml", "train.max_steps=3", "-h"]):
        assert main(["uptrain", *argv]) == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: clakit uptrain") and "--resume" in out
