"""Files and folders this user may not read: one line naming the path and the fix, exit 2, never a traceback.
Tests run as root in CI, where permission bits do not bite, so the denial is injected where the OS would give it;
measured as the user nobody (stop 50): `clakit convert|eval` of a mode-700 folder of root's ended in a
PermissionError traceback from the look for its config.json, and an OUT under a folder nobody may list in one from
the look for a clakit output above it."""

import os
from pathlib import Path

import pytest

from clakit.cli import main


def deny_reading(monkeypatch, denied: Path) -> None:
    real = os.access

    def access(path, mode, *args, **kwargs):
        return False if Path(path) == denied and mode & os.R_OK else real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


@pytest.mark.parametrize("command", ["convert", "eval"])
def test_a_model_folder_this_user_may_not_read_is_one_line(command, tiny_llama_checkpoint, corpus_dir, tmp_path,
                                                           monkeypatch, capsys):  # fmt: skip
    deny_reading(monkeypatch, tiny_llama_checkpoint)
    out = tmp_path / "out"
    argv = {"convert": ["convert", str(tiny_llama_checkpoint), str(out)],
            "eval": ["eval", str(tiny_llama_checkpoint), "-o", str(out), "--data", str(corpus_dir / "heldout.txt")]}
    assert main([*argv[command], "-q"]) == 2
    err = capsys.readouterr().err
    assert err == f"clakit: error: cannot read the model folder {tiny_llama_checkpoint}: permission denied; make it " \
                  "readable (chmod a+rX) or run as a user who may read it\n"
    assert not out.exists()


def test_an_out_below_a_folder_this_user_may_not_list_is_not_taken_for_a_clakit_output(tmp_path, monkeypatch):
    from clakit import outputs

    above = tmp_path / "shared"
    above.mkdir()
    real = Path.iterdir

    def iterdir(self):
        if self == above:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    outputs.check_not_inside_an_output(above / "out", "OUT")  # returns: nothing above OUT is clakit's


def test_a_permission_error_no_check_foresaw_is_one_line(monkeypatch, capsys, tmp_path):
    """The last net: whatever raises PermissionError (a file made unreadable mid-run) is one line and exit 2."""
    from clakit import cli

    def run(args):
        raise PermissionError(13, "Permission denied", "/srv/models/x/tokenizer.json")

    monkeypatch.setattr(cli, "_run_convert", run)
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (
        "clakit: error: permission denied: /srv/models/x/tokenizer.json; make it accessible to this user\n"
    )
