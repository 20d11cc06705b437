"""Every output path clakit must refuse (the ownership rule of clakit.outputs), as one table: exit 2, one line, no
traceback, nothing written anywhere under the test folder, and for the data-loss cases the files still there.

Placeholders: {tmp} the test folder (also the working directory's parent: the commands run in {tmp}/work),
{model} a stock tiny Llama, {cla} a tiny CLA2 checkpoint, {data} a folder with train.txt / heldout.txt,
{recipe} a tiny uptrain recipe using them, {home} the HOME the command sees, {report} a clakit eval report.
Setup helpers add more: a user's folder ({mine}), a file ({f}), earlier clakit outputs ({conv}, {run}, {rep}).
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from bad_input import Case, assert_refused, both, check, make_file, make_folder, run_clakit, snapshot
from conftest import make_text, tiny_model
from uptrain_fixtures import tiny_cla_checkpoint, tiny_recipe  # noqa: F401

import clakit.eval
import clakit.outputs
from clakit.eval import evaluate, write_json
from clakit.outputs import MARKER
from clakit.uptrain import pipeline, student

HOME = {"HOME": "{home}"}
UP = "uptrain {recipe} -q train.output_dir="  # the tiny recipe; each case appends its output_dir


def clakit_output(name: str, kind: str, files=("config.json",)) -> callable:
    """setup: {tmp}/NAME as an earlier clakit output of `kind` (the marker clakit writes when it publishes)."""

    def setup(paths: dict) -> None:
        folder = Path(paths["tmp"]) / name
        folder.mkdir()
        for f in files:
            (folder / f).write_text("{}")
        clakit.outputs.write_marker(folder, kind)
        paths[name] = str(folder)

    return setup


def add_file(name: str, rel: str) -> callable:
    """setup: a user's file put into the folder {NAME} afterwards."""
    return lambda paths: Path(paths[name], rel).write_text("my notes\n")


def link(name: str, target: str) -> callable:
    def setup(paths: dict) -> None:
        paths[name] = str(Path(paths["tmp"]) / name)
        os.symlink(paths[target], paths[name])

    return setup


def loop(paths: dict) -> None:
    """{loop}: a link to itself."""
    paths["loop"] = str(Path(paths["tmp"]) / "loop")
    os.symlink("loop", paths["loop"])


def unwritable(paths: dict) -> None:
    """{ro}: a folder no file can be created in: mode 555, or for root (who ignores modes) sysfs's root."""
    if os.geteuid() == 0:
        paths["ro"] = "/sys"
        return
    ro = Path(paths["tmp"]) / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    paths["ro"] = str(ro)


CASES = [
    # --- convert: what --overwrite may replace
    Case("convert {model} {mine} -q", "is not a clakit convert output (not written by clakit)", make_folder("mine"),
         protect=("mine",), forbid="--overwrite", id="convert-user-folder"),
    Case("convert {model} {mine} --overwrite -q", "is not a clakit convert output", make_folder("mine"),
         protect=("mine",), id="convert-user-folder-overwrite"),
    Case("convert {model} {f} --overwrite -q", "is an existing file", make_file("f"), protect=("f",),
         forbid="--overwrite", id="convert-file-overwrite"),
    Case("convert {model} {tmp} --overwrite -q", "is an ancestor of the working directory", protect=("model",),
         id="convert-ancestor-of-cwd"),
    Case("convert {model} {tmp}/work --overwrite -q", "is the working directory", id="convert-cwd"),
    Case("convert {model} . --overwrite -q", "is the working directory", id="convert-dot"),
    Case("convert {model} ~ --overwrite -q", "is your home folder", env=HOME, protect=("home",), id="convert-home"),
    Case("convert {model} {tmp}/users --overwrite -q", "an ancestor of your home folder", make_folder("users/me"),
         env={"HOME": "{tmp}/users/me"}, id="convert-home-up"),
    Case("convert {model} / --overwrite -q", "is the root folder", id="convert-root"),
    Case("convert {mine}/model {mine} --overwrite -q", "contains the source",
         both(make_folder("mine"), lambda p: shutil.copytree(p["model"], Path(p["mine"], "model"))),
         protect=("mine",), id="convert-contains-source"),
    Case("convert {model} {model}/cla -q", "is inside the source", id="convert-inside-source"),
    Case("convert {model} {model} --overwrite -q", "is the source", protect=("model",), id="convert-is-source"),
    Case("convert {model} {data} --overwrite --calib-data {data}/train.txt -q", "contains the calibration data",
         protect=("data",), id="convert-contains-calib"),
    Case("convert {model} {data} --overwrite --init mean --eval-data {data}/heldout.txt -q",
         "contains the eval data", protect=("data",), id="convert-contains-eval-data"),
    Case("convert {model} {run} --overwrite -q", "is not a clakit convert output (a clakit uptrain run)",
         clakit_output("run", "uptrain"), protect=("run",), id="convert-over-uptrain-run"),
    Case("convert {model} {conv} -q", "already exists; pass --overwrite to replace it",
         clakit_output("conv", "convert"), id="convert-own-output-no-flag"),
    Case("convert {model} {conv} --overwrite -q", "holds files clakit did not write (notes.md)",
         both(clakit_output("conv", "convert"), add_file("conv", "notes.md")), id="convert-own-output-user-file"),
    Case("convert {model} {l} --overwrite -q", "is a link to", both(clakit_output("conv", "convert"),
         link("l", "conv")), id="convert-symlink"),
    Case("convert {model} {f}/out -q", "is a file, not a folder", make_file("f"), id="convert-parent-is-file"),
    # --- a loop of links as OUT or above it: pathlib's RuntimeError "Symlink loop" was a traceback
    Case("convert {model} {loop} -q", "/loop is a link to loop; give a real folder", loop, id="convert-link-loop"),
    Case("convert {model} {loop}/out -q", "/loop/out cannot be used (Symlink loop from", loop,
         id="convert-under-link-loop"),
    Case("report {report} -o {loop}/rep", "/loop/rep cannot be used (Symlink loop from", loop,
         id="report-under-link-loop"),
    Case("eval {model} -o {loop}/r.json --data {data}/heldout.txt --quiet",
         "/loop is a link that leads to nothing, not a folder", loop, id="eval-under-link-loop"),
    Case("convert {model} {ro}/out -q", "cannot write into", unwritable, id="convert-unwritable"),
    # --- uptrain: train.output_dir
    Case(UP + "~/" + " --overwrite", "is your home folder", make_folder("home"), env=HOME,
         protect=("home",), id="uptrain-home"),
    Case(UP + "/" + " --overwrite", "is the root folder", id="uptrain-root"),
    Case(UP + "." + " --overwrite", "is the working directory", id="uptrain-cwd"),
    Case(UP + ".." + " --overwrite", "is an ancestor of the working directory", id="uptrain-cwd-up"),
    Case(UP + "{cla}/.." + " --overwrite", "an ancestor of the working directory", protect=("cla",),
         id="uptrain-ancestor"),
    Case(UP + "{mine}" + " --overwrite model.path={mine}/cla", "contains the model",
         both(make_folder("mine"), lambda p: shutil.copytree(p["cla"], Path(p["mine"], "cla"))),
         protect=("mine",), id="uptrain-contains-model-path"),
    Case(UP + "{cla}/run", "is inside the model", id="uptrain-inside-model"),
    Case(UP + "{cla}" + " --overwrite", "is the model", protect=("cla",), id="uptrain-is-model"),
    Case(UP + "{data}/train.txt" + " --overwrite", "is the training data", protect=("data",), id="uptrain-is-data"),
    Case(UP + "{data}" + " --overwrite", "contains the training data", protect=("data",),
         id="uptrain-contains-train-data"),
    Case(UP + "{mine}" + " --overwrite data.eval=[{mine}/h.txt]", "contains the held-out data",
         both(make_folder("mine"), lambda p: shutil.copy(Path(p["data"], "heldout.txt"), Path(p["mine"], "h.txt"))),
         protect=("mine",), id="uptrain-contains-eval-data"),
    Case(UP + "{conf}" + " --overwrite", "contains the recipe",
         make_folder("conf", {"keep.txt": "mine"}), id="uptrain-contains-recipe"),
    Case(UP + "{mine}" + " --overwrite model.original={mine}/orig", "contains the teacher",
         both(make_folder("mine"), lambda p: shutil.copytree(p["model"], Path(p["mine"], "orig"))),
         protect=("mine",), id="uptrain-contains-teacher"),
    Case(UP + "{mine}", "is not a clakit uptrain run (not written by clakit)", make_folder("mine"),
         protect=("mine",), forbid="--overwrite", id="uptrain-user-folder"),
    Case(UP + "{mine}" + " --overwrite", "is not a clakit uptrain run", make_folder("mine"),
         protect=("mine",), id="uptrain-user-folder-overwrite"),
    Case(UP + "{f}" + " --overwrite", "is an existing file", make_file("f"), protect=("f",),
         forbid="--overwrite", id="uptrain-file"),
    Case(UP + "{conv}" + " --overwrite", "is not a clakit uptrain run (a clakit convert output)",
         clakit_output("conv", "convert"), id="uptrain-over-convert-output"),
    Case(UP + "{run}", "already exists; continue it with --resume or replace it with --overwrite",
         clakit_output("run", "uptrain"), id="uptrain-own-run-no-flag"),
    Case(UP + "{run}" + " --overwrite", "holds files clakit did not write (my-eval.py)",
         both(clakit_output("run", "uptrain"), add_file("run", "my-eval.py")), id="uptrain-own-run-user-file"),
    Case(UP + "{run}" + " --overwrite", "holds files clakit did not write (.notes.old)",
         both(clakit_output("run", "uptrain"), add_file("run", ".notes.old")), id="uptrain-own-run-user-dotfile"),
    Case(UP + "{f}/run", "is a file, not a folder", make_file("f"), id="uptrain-parent-is-file"),
    Case(UP + "{ro}/run", "cannot write into", unwritable, id="uptrain-unwritable"),
    # --- eval -o: a new file or a clakit report, in a writable folder; checked before the model is even loaded
    Case("eval {model} -o {f}/r.json --data {data}/heldout.txt --quiet", "is a file, not a folder", make_file("f"),
         id="eval-parent-is-file"),
    Case("eval {tmp}/no-model -o {f}/r.json", "is a file, not a folder", make_file("f"), id="eval-checked-first"),
    Case("eval {model} -o {f} --quiet", "is not a clakit eval report", make_file("f", '{"a": 1}'), protect=("f",),
         id="eval-user-json"),
    Case("eval {model} -o {model}/config.json --quiet", "is not a clakit eval report", protect=("model",),
         id="eval-over-config"),
    Case("eval {model} -o {mine} --quiet", "is a folder; give a file name", make_folder("mine"), id="eval-folder"),
    Case("eval {model} -o {ro}/r.json --quiet", "cannot write into", unwritable, id="eval-unwritable"),
    Case("eval {model} -o {l} --quiet", "is a link to", link("l", "report"), id="eval-symlink"),
    Case("eval {model} -o {report} --data {report} --seq-len 32 --no-speed --quiet", "is also given as --data",
         protect=("report",), id="eval-output-is-data"),
    # --- report -o: a new folder or a clakit report folder (replaced without a flag)
    Case("report {report} -o {mine}", "is not a clakit report folder (not written by clakit)", make_folder("mine"),
         protect=("mine",), id="report-user-folder"),
    Case("report {report} -o {f}", "is an existing file", make_file("f"), protect=("f",), id="report-file"),
    Case("report {report} -o .", "is the working directory", id="report-cwd"),
    Case("report {report} -o {data}", "is not a clakit report folder", id="report-data-folder"),
    Case("report {rep}/a.json -o {rep}", "contains the report",
         both(clakit_output("rep", "report", ["report.md"]), lambda p: shutil.copy(p["report"], p["rep"] + "/a.json")),
         id="report-contains-input"),
    Case("report {report} -o {rep}", "holds files clakit did not write (notes.md)",
         both(clakit_output("rep", "report", ["report.md"]), add_file("rep", "notes.md")), id="report-user-file"),
    Case("report {report} -o {mine}", "is not a clakit report folder (not written by clakit)",
         make_folder("mine", {"report.html": "<html>my own report</html>", "report.md": "# mine"}), protect=("mine",),
         id="report-user-folder-named-like-a-report"),
    Case("report {report} -o {f}/r", "is a file, not a folder", make_file("f"), id="report-parent-is-file"),
    Case("report {report} -o {ro}/r", "cannot write into", unwritable, id="report-unwritable"),
    # --- demo: its work folder's outputs, all checked before the first stage (nothing fetched)
    Case("demo --work-dir {w} --cache-dir {tmp}/cache --quiet", "converted already exists and is not a clakit convert",
         make_folder("w", {"converted/keep.txt": "mine"}), protect=("w",), id="demo-user-converted"),
    Case("demo --work-dir {w} --cache-dir {tmp}/cache --quiet", "demo.json exists and is not a clakit demo summary; "
         "clakit replaces only its own files: move it away, or choose another --work-dir",
         make_folder("w", {"demo.json": "{}"}), protect=("w",), id="demo-user-summary"),
    Case("demo --work-dir {w} --cache-dir {tmp}/cache --quiet", "demo.json is a folder; move it away, or choose "
         "another --work-dir", make_folder("w", {"demo.json/keep.txt": "mine"}), protect=("w",),
         id="demo-summary-is-a-folder"),
    Case("demo --work-dir . --cache-dir {tmp}/cache --quiet", "reports/original.json exists and is not a clakit eval",
         make_folder("work", {"reports/original.json": "[]"}), id="demo-user-report"),
    # --- `~name/...` of a user this system does not know: pathlib's RuntimeError was a traceback from every command
    Case("convert {model} ~nosuchuser-clakit/out -q", "names the home folder of an unknown user",
         id="convert-tilde-user"),
    Case("convert ~nosuchuser-clakit/m {tmp}/out -q", "names the home folder of an unknown user",
         id="convert-tilde-src"),
    Case("eval {model} -o ~nosuchuser-clakit/r.json --quiet", "names the home folder of an unknown user",
         id="eval-tilde-output"),
    Case("eval {model} -o {tmp}/r.json --data ~nosuchuser-clakit/a.txt --quiet",
         "names the home folder of an unknown user", id="eval-tilde-data"),
    Case(UP + "~nosuchuser-clakit/run", "names the home folder of an unknown user", id="uptrain-tilde-output"),
    # --- a name over the file system's 255 bytes, or a path over 4,095: the first look at it was an OSError traceback
    Case(f"convert {{tmp}}/{'m' * 300} {{tmp}}/out -q", "model path has a name of 300 bytes", id="convert-long-src"),
    Case(f"convert {{model}} {{tmp}}/out -q --calib-data {{tmp}}/{'c' * 256}", "path has a name of 256 bytes",
         id="convert-long-calib"),
    Case(f"eval {{tmp}}/{'m' * 256}/x -o {{tmp}}/r.json --quiet", "model path has a name of 256 bytes",
         id="eval-long-model-parent"),
    Case(f"eval {{model}} -o {{tmp}}/r.json --data {{tmp}}/{'d/' * 2100}a.txt --quiet",
         "--data path is 4", id="eval-data-path-max"),
    Case(f"report {{tmp}}/{'r' * 256}.json -o {{tmp}}/rep --quiet", "path has a name of 261 bytes",
         id="report-long-input"),
    Case(f"uptrain {{tmp}}/{'u' * 300}.yaml -q", "recipe path has a name of 305 bytes", id="uptrain-long-recipe"),
    Case(f"eval {{model}} -o {{tmp}}/{'o' * 256}/r.json --quiet", "path has a name of 256 bytes",
         id="eval-long-output-parent"),
    # --- `-`, the usual standard input/output, became a file or folder named `-` in the working directory
    Case("convert {model} - -q", "- (standard input or output) is not supported", id="convert-dash-output"),
    Case("fetch-demo - --quiet", "- (standard input or output) is not supported", id="fetch-demo-dash"),
    Case("demo --work-dir - --cache-dir {tmp}/cache --quiet", "- (standard input or output) is not supported",
         id="demo-dash-work-dir"),
]  # fmt: skip


@pytest.fixture(scope="module")
def eval_report(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("report") / "orig.json"
    model = tiny_model("llama")
    kwargs = dict(tokenizer=tokenizer, text=make_text(400, 21), batch_size=2, speed=False, quiet=True)
    return write_json(evaluate(model, seq_len=32, name="orig", **kwargs), path)


@pytest.fixture
def paths(tmp_path, tiny_llama_checkpoint, tiny_cla_checkpoint, corpus_dir, eval_report) -> dict:  # noqa: F811
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.txt", "heldout.txt"):
        shutil.copy(corpus_dir / name, data / name)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "keep.txt").write_text("mine\n")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "keep.txt").write_text("mine\n")
    (tmp_path / "conf").mkdir()
    recipe = tiny_recipe(data, tmp_path / "run", model={"path": str(tmp_path / "cla")})
    (tmp_path / "conf" / "r.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    shutil.copy(eval_report, tmp_path / "orig.json")
    return {
        "tmp": tmp_path,
        "model": shutil.copytree(tiny_llama_checkpoint, tmp_path / "model"),
        "cla": shutil.copytree(tiny_cla_checkpoint, tmp_path / "cla"),
        "data": data,
        "recipe": tmp_path / "conf" / "r.yaml",
        "home": tmp_path / "home",
        "report": tmp_path / "orig.json",
    }


@pytest.mark.parametrize("case", CASES, ids=str)
def test_refused(case, paths, tmp_path):
    check(case, paths, watch=[tmp_path], cwd=tmp_path / "work")


# --- what the rule lets through, and the failures while writing --------------------------------------------------


def test_convert_overwrite_replaces_its_own_output_and_an_older_clakits(paths, tmp_path):
    out = tmp_path / "out"
    assert run_clakit("convert", paths["model"], out, "-q").code == 0
    marker = json.loads((out / MARKER).read_text())
    assert marker["kind"] == "convert" and "clakit_convert.json" in marker["files"] and len(marker["run_id"]) == 32
    # the files it lists are the folder's (the staging stamp, gone once published, was listed: `|` before `-`)
    assert marker["files"] == sorted(p.name for p in out.iterdir() if p.name != MARKER), marker["files"]
    assert run_clakit("convert", paths["model"], out, "--overwrite", "-q").code == 0
    assert json.loads((out / MARKER).read_text())["run_id"] != marker["run_id"]
    (out / MARKER).unlink()  # as written by clakit before the marker existed: clakit_convert.json identifies it
    assert run_clakit("convert", paths["model"], out, "--overwrite", "--factor", "4", "-q").code == 0
    assert json.loads((out / "config.json").read_text())["kv_source_layers"] == [0, 0, 0, 0]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # nothing left aside


def test_an_older_clakits_output_holding_a_users_files_is_not_overwritten(paths, tmp_path):
    """An output of clakit before the marker (12-02) had no file list, so --overwrite replaced it whole: a user's
    notes.txt and myeval/ in an old conversion, or analysis/ in an old run, were deleted (helper 50o). The names
    that clakit wrote then are known; anything else is refused, as in a marked output."""
    from clakit.outputs import foreign_files

    out = tmp_path / "out"
    assert run_clakit("convert", paths["model"], out, "-q").code == 0
    (out / MARKER).unlink()  # as an older clakit left it
    (out / "notes.txt").write_text("mine\n")
    (out / "myeval").mkdir()
    result = run_clakit("convert", paths["model"], out, "--overwrite", "-q")
    assert result.code == 2 and "holds files clakit did not write (myeval, notes.txt)" in result.err, result.err
    assert (out / "notes.txt").read_text() == "mine\n" and (out / "myeval").is_dir()
    run = tmp_path / "run"
    for name in ("checkpoints", "model", "eval"):
        (run / name).mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"fingerprint": "f", "recipe": {}}))
    (run / "analysis").mkdir()
    assert foreign_files(run) == ["analysis"]
    (run / ".model.tmp").mkdir()  # what an old run killed while saving its result left (not a user's)
    (out / MARKER).unlink(missing_ok=True)
    for name in (".backup.20261205.old", "my_tokenization.py"):  # a user's, though staging-like / pattern-like
        (out / name).mkdir() if name.startswith(".") else (out / name).write_text("x")
    assert foreign_files(run) == ["analysis"]  # helper 50s: every staging-like name and *tokenization*.py passed
    assert {".backup.20261205.old", "my_tokenization.py"} <= set(foreign_files(out))


def test_an_older_clakits_demo_summary_file_is_replaceable(tmp_path):
    """demo.json before its format key (12-02) was refused as "not a clakit demo summary" (helper 50o); one of
    exactly its keys with clakit's version is clakit's, a look-alike without that is not."""
    from clakit.errors import ClakitError
    from clakit.outputs import check_file

    old = {"timings_s": {}, "total_s": 1.0, "models": {}, "settings": {}, "provenance": {"clakit": "0.1.0"}}
    path = tmp_path / "demo.json"
    path.write_text(json.dumps(old))
    check_file(path, "clakit-demo/1", noun="demo summary")
    for other in ({**old, "provenance": {}}, 5, None):  # 5 and null: a TypeError traceback (helper 50s)
        path.write_text(json.dumps(other))
        with pytest.raises(ClakitError, match="exists and is not a clakit demo summary"):
            check_file(path, "clakit-demo/1", noun="demo summary")


def test_fifos_under_clakits_names_are_refused_not_waited_on(paths, tmp_path):
    """A named pipe where clakit reads its own records (an output's marker, a report page, an eval report) blocked
    the read for good: refused in one line now. A marker clakit cannot read is not an older clakit's missing one:
    the folder is not replaced as a marker-less older output (it was, with --overwrite, and the FIFO with it)."""
    out = tmp_path / "out"
    assert run_clakit("convert", paths["model"], out, "-q").code == 0
    (out / MARKER).unlink()
    os.mkfifo(out / MARKER)
    page = tmp_path / "rep"
    page.mkdir()
    (page / "report.md").write_text("mine\n")
    os.mkfifo(page / "report.html")
    os.mkfifo(tmp_path / "r.json")
    for argv in (["convert", paths["model"], out, "--overwrite", "-q"], ["report", paths["report"], "-o", page],
                 ["eval", paths["model"], "-o", tmp_path / "r.json", "--data", paths["data"], "--quiet"]):
        before = snapshot(tmp_path)
        run = run_clakit(*argv, subprocess_run=True, timeout=120)
        assert run.code == 2 and "clakit replaces only its own" in run.err and len(run.err.splitlines()) == 1, run
        assert snapshot(tmp_path) == before


def test_an_empty_existing_folder_is_used(paths, tmp_path):
    (tmp_path / "out").mkdir()
    assert run_clakit("convert", paths["model"], tmp_path / "out", "-q").code == 0
    assert (tmp_path / "out" / "config.json").is_file()


def test_report_and_eval_replace_their_own_outputs(paths, tmp_path):
    rep = tmp_path / "rep"
    assert run_clakit("report", paths["report"], "-o", rep).code == 0
    first = snapshot(rep)
    assert run_clakit("report", paths["report"], "-o", rep).code == 0  # its own folder: replaced, no flag needed
    assert set(snapshot(rep)) == set(first) and (rep / "report.html").is_file()
    legacy = tmp_path / "legacy"
    shutil.copytree(rep, legacy)
    (legacy / MARKER).unlink()  # an older clakit's report folder: just the three files
    assert run_clakit("report", paths["report"], "-o", legacy).code == 0
    (legacy / MARKER).unlink()
    (legacy / "passkey.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # one whose reports had passkey scores
    assert run_clakit("report", paths["report"], "-o", legacy).code == 0
    again = tmp_path / "again.json"
    shutil.copy(paths["report"], again)
    run = run_clakit("eval", paths["model"], "-o", again, "--data", f"{paths['data']}/heldout.txt", "--seq-len", "32",
                     "--max-tokens", "64", "--no-speed", "--quiet")  # fmt: skip
    assert run.code == 0, run.err
    assert json.loads(again.read_text())["model"] == str(paths["model"])


def test_eval_output_checked_before_the_evaluation(paths, tmp_path, monkeypatch):
    """A bad -o is refused before the model is loaded: the evaluation never starts."""

    def evaluate_must_not_run(*args, **kwargs):
        raise AssertionError("evaluated before checking -o")

    monkeypatch.setattr(clakit.eval, "evaluate", evaluate_must_not_run)
    (tmp_path / "f").write_text("mine")
    assert_refused(["eval", paths["model"], "-o", tmp_path / "f" / "r.json"], "is a file, not a folder",
                   watch=[tmp_path])  # fmt: skip


def test_eval_disk_full_while_writing_the_report_leaves_nothing(paths, tmp_path, monkeypatch, no_bars):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(clakit.outputs.os, "replace", full)
    out = tmp_path / "r.json"
    args = ["eval", paths["model"], "-o", out, "--data", f"{paths['data']}/heldout.txt", "--seq-len", "32",
            "--max-tokens", "64", "--no-speed", "--quiet"]  # fmt: skip
    assert_refused(args, f"cannot write {out}: No space left on device", watch=[tmp_path])


@pytest.fixture
def no_bars():
    """transformers' "Loading weights" bars ignore --quiet in eval/uptrain (issue 14 item 5, another change): off
    here, so these tests check one error line and nothing else."""
    from transformers.utils import logging

    was_on = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    yield
    if was_on:
        logging.enable_progress_bar()


def uptrain_args(paths, *extra) -> list:
    return ["uptrain", paths["recipe"], f"train.output_dir={paths['tmp']}/run", "-q", *extra]


def test_uptrain_disk_full_while_saving_the_result_keeps_the_run_for_resume(paths, tmp_path, monkeypatch, no_bars):
    """No half-written model/ (no .model.tmp, no staging folder); the checkpoints stay, --resume finishes it."""
    real_save = student.save_cla

    def full(model, tokenizer, out, *args):
        (out / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(student, "save_cla", full)
    run = tmp_path / "run"
    before = snapshot(tmp_path / "model", tmp_path / "cla", tmp_path / "data", tmp_path / "conf")
    r = run_clakit(*uptrain_args(paths))
    assert r.code == 2 and len(r.err_lines) == 1 and "Traceback" not in r.err, r.err
    assert f"cannot write {run / 'model'}: No space left on device" in r.err
    assert "the run is kept in" in r.err and "--resume" in r.err
    assert not (run / "model").exists() and not [p for p in run.iterdir() if p.name.startswith(".model")]
    assert (run / "checkpoints").is_dir()
    monkeypatch.setattr(student, "save_cla", real_save)
    assert run_clakit(*uptrain_args(paths, "--resume")).code == 0
    assert (run / "model" / "model.safetensors").is_file()
    assert before == snapshot(tmp_path / "model", tmp_path / "cla", tmp_path / "data", tmp_path / "conf")


@pytest.mark.parametrize("error, code", [("clakit", 2), ("interrupt", 130), ("bug", 1), ("disk", 2)])
def test_uptrain_failing_before_a_checkpoint_leaves_nothing(paths, tmp_path, monkeypatch, error, code, no_bars):
    """The run folder is in place (eval/, recipe.yaml, run.json) when training starts; a failure before the first
    checkpoint removes it again: nothing half-written (a bug's traceback is another matter: issue 14 item 2)."""
    from clakit.errors import ClakitError
    from clakit.uptrain.trainer import Trainer

    def fail(self):
        assert (tmp_path / "run" / "run.json").is_file() and (tmp_path / "run" / "eval").is_dir()
        errors = {
            "clakit": ClakitError("the loss became nan at step 1"),
            "interrupt": KeyboardInterrupt,
            "disk": OSError(errno.ENOSPC, "No space left on device"),
        }
        raise errors.get(error, ZeroDivisionError("integer division or modulo by zero"))

    monkeypatch.setattr(Trainer, "train_step", fail)
    before = snapshot(tmp_path)
    r = run_clakit(*uptrain_args(paths))
    assert r.code == code and (len(r.err_lines) == 1 or error == "bug"), r.err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("error, code", [("interrupt", 130), ("clakit", 2)])
def test_an_overwrite_failing_before_its_first_checkpoint_puts_the_old_run_back(
    paths, tmp_path, monkeypatch, error, code, no_bars
):
    """--overwrite published the new run folder (moving the old one aside) before training, and removed the old
    run at once: Ctrl-C or an error before the new run's first checkpoint lost both. The old run is kept aside
    until the new one writes a checkpoint, and put back when it stops before that; removed after."""
    from clakit.errors import ClakitError
    from clakit.uptrain.trainer import Trainer

    assert run_clakit(*uptrain_args(paths, "train.max_steps=2")).code == 0
    before = snapshot(tmp_path)
    train_step = Trainer.train_step

    def fail_at_step_2(self):
        if self.step == 1:
            raise KeyboardInterrupt if error == "interrupt" else ClakitError("the loss became nan at step 2")
        return train_step(self)

    monkeypatch.setattr(Trainer, "train_step", fail_at_step_2)
    r = run_clakit(*uptrain_args(paths, "train.max_steps=4", "train.save_steps=2", "--overwrite"))
    assert r.code == code, r.err
    assert snapshot(tmp_path) == before  # the old run as it was, nothing left beside it
    r = run_clakit(*uptrain_args(paths, "train.max_steps=4", "train.save_steps=1", "--overwrite"))
    assert r.code == code, r.err  # stopped after its first checkpoint: the new run is kept for --resume
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000001"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # the old one removed


def test_another_command_during_an_overwrite_leaves_the_old_run_it_keeps_aside(paths, tmp_path, monkeypatch, no_bars):
    """The kept run's lock was released with the staging folder: a second `clakit uptrain` on the same folder (a
    mistake, refused as in use) reclaimed the old run as a leftover, and the Ctrl-C that followed lost both runs with
    a traceback (helper K)."""
    from clakit.uptrain.trainer import Trainer

    assert run_clakit(*uptrain_args(paths, "train.max_steps=2")).code == 0
    before = snapshot(tmp_path)
    train_step, other = Trainer.train_step, []

    def another_command_then_ctrl_c(self):
        if self.step == 1:
            other.append(run_clakit(*uptrain_args(paths), subprocess_run=True, cwd=tmp_path))
            raise KeyboardInterrupt
        return train_step(self)

    monkeypatch.setattr(Trainer, "train_step", another_command_then_ctrl_c)
    r = run_clakit(*uptrain_args(paths, "train.max_steps=4", "train.save_steps=2", "--overwrite"))
    assert r.code == 130 and other[0].code == 2 and "in use by a running clakit process" in other[0].err, other
    assert snapshot(tmp_path) == before


def test_an_overwrite_killed_before_its_first_checkpoint_gets_the_old_run_back(paths, tmp_path, no_bars):
    """kill -9 (the OOM killer, a scheduler) before the new run's first checkpoint left the old run hidden beside
    it: --resume retrained the new run from nothing and kept the old one hidden, the next --overwrite deleted it.
    The next command on that output_dir puts it back now (its dead run's stamp says it was kept)."""
    driver = (
        "import os, signal, sys\n"
        "from clakit.uptrain.trainer import Trainer\n"
        "step = Trainer.train_step\n"
        "def die(self):\n"
        "    if self.step == 1:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return step(self)\n"
        "Trainer.train_step = die\n"
        "from clakit.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    assert run_clakit(*uptrain_args(paths, "train.max_steps=2")).code == 0
    before = snapshot(tmp_path / "run")
    args = [str(a) for a in uptrain_args(paths, "train.max_steps=4", "train.save_steps=2", "--overwrite")]
    killed = subprocess.run([sys.executable, "-c", driver, *args], capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL and len(list(tmp_path.glob(".run.*.old"))) == 1, killed.stderr
    r = run_clakit(*uptrain_args(paths, "train.max_steps=4", "--resume"))
    assert r.code == 2 and "has finished" in r.err, r.err  # the old run, back: finished with another recipe
    assert snapshot(tmp_path / "run") == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_an_overwrite_whose_first_checkpoint_fails_keeps_the_old_run(paths, tmp_path, monkeypatch, no_bars):
    """The old run was dropped just before the first checkpoint was written: a full disk (or Ctrl-C) during that
    write lost both runs. It is dropped once the checkpoint is written (the space check counted it still there)."""
    from clakit.uptrain import checkpoint

    assert run_clakit(*uptrain_args(paths, "train.max_steps=2")).code == 0
    before = snapshot(tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    r = run_clakit(*uptrain_args(paths, "train.max_steps=4", "train.save_steps=2", "--overwrite"))
    assert r.code == 2 and "could not write checkpoint step-000002" in r.err, r.err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("error, code", [("disk", 2), ("interrupt", 130)])
def test_an_overwrite_without_checkpoints_keeps_the_old_run_until_its_model_is_in_place(
    paths, tmp_path, monkeypatch, error, code, no_bars
):
    """A run that saves no checkpoint (train.save_steps=0) dropped the old run just before writing its model: a full
    disk or Ctrl-C during that write lost both. The old run is dropped once the new model is in place now."""
    assert run_clakit(*uptrain_args(paths, "train.max_steps=2")).code == 0
    before = snapshot(tmp_path)

    def fail(model, tokenizer, out, *args):
        (out / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt if error == "interrupt" else OSError(errno.ENOSPC, "No space left on device")

    real_save = student.save_cla
    monkeypatch.setattr(student, "save_cla", fail)
    r = run_clakit(*uptrain_args(paths, "train.max_steps=3", "train.save_steps=0", "--overwrite"))
    assert r.code == code, r.err
    assert snapshot(tmp_path) == before  # the old run as it was, nothing left beside it
    monkeypatch.setattr(student, "save_cla", real_save)
    r = run_clakit(*uptrain_args(paths, "train.max_steps=3", "train.save_steps=0", "--overwrite"))
    assert r.code == 0 and (tmp_path / "run" / "model" / "config.json").is_file(), r.err
    assert json.loads((tmp_path / "run" / "run.json").read_text())["recipe"]["train"]["max_steps"] == 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # the old one removed


def test_a_relative_output_past_path_max_once_absolute_is_one_line(paths, tmp_path):
    """The length check measured the path as typed: a relative -o under a deep working folder passed it and was an
    OSError traceback ("File name too long") once made absolute (helper K: a 3,533-byte working folder)."""
    deep = tmp_path
    while len(os.fsencode(str(deep))) < 3500:
        deep = deep / ("d" * 200)
    deep.mkdir(parents=True)
    relative = "/".join(["e" * 200] * 3) + "/r.json"
    for argv in (["eval", paths["model"], "-o", relative], ["report", paths["report"], "-o", relative[:-7]]):
        r = run_clakit(*argv, cwd=deep)
        assert r.code == 2 and len(r.err_lines) == 1 and "bytes long" in r.err and "shorter path" in r.err, r.err


def test_uptrain_disk_full_while_setting_up_its_folder_is_one_line(paths, tmp_path, monkeypatch, no_bars):
    """recipe.yaml, run.json and eval/ are written into the staging folder before the run is published: a full disk
    there was an OSError traceback, exit 1 (measured on a tmpfs out of inodes)."""
    from clakit.uptrain.recipe import Recipe

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Recipe, "to_yaml", full)  # recipe.yaml, the first file _setup writes
    before = snapshot(tmp_path)
    r = run_clakit(*uptrain_args(paths))
    assert r.code == 2 and len(r.err_lines) == 1, r.err
    assert f"cannot write {tmp_path}/run: No space left on device; check free disk space" in r.err
    assert snapshot(tmp_path) == before


def test_a_staging_folder_whose_stamp_cannot_be_written_is_removed(tmp_path, monkeypatch):
    """mkdtemp made the folder, then the stamp failed (a full disk, no inodes left): the unstamped folder was left,
    one per failed run, and no later run reclaims an unstamped folder."""
    from clakit import outputs
    from clakit.errors import ClakitError

    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "_stamp", full)
    with pytest.raises(ClakitError, match="cannot create the output folder beside .*: No space left on device; free"):
        outputs.make_staging(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_eval_refuses_a_full_disk_or_a_mounted_file_before_the_evaluation(paths, tmp_path, monkeypatch):
    """An empty probe file fits on a full disk: the evaluation ran (hours with lm-eval tasks), then its report
    could not be written and the numbers were lost. A report file that is a mount point (a bind-mounted file) took
    no rename either."""
    def evaluate_must_not_run(*args, **kwargs):
        raise AssertionError("evaluated before checking -o")

    monkeypatch.setattr(clakit.eval, "evaluate", evaluate_must_not_run)
    real = clakit.outputs.shutil.disk_usage
    monkeypatch.setattr(clakit.outputs.shutil, "disk_usage", lambda p: real(p)._replace(free=4096))
    assert_refused(["eval", paths["model"], "-o", tmp_path / "r.json"], "no room for r.json in", watch=[tmp_path])
    monkeypatch.setattr(clakit.outputs.shutil, "disk_usage", real)
    shutil.copy(paths["report"], tmp_path / "m.json")  # an eval report of clakit's: replaceable, but not by rename
    monkeypatch.setattr(clakit.outputs, "_is_mount_point", lambda p: Path(p).name == "m.json")
    assert_refused(["eval", paths["model"], "-o", tmp_path / "m.json"], "is a mount point (a bind-mounted file)",
                   watch=[tmp_path])  # fmt: skip


def test_uptrain_runs_on_one_output_dir_never_share_a_staging_folder(paths, tmp_path, monkeypatch):
    """A second uptrain on the same output_dir starts while the first is preparing: each has its own staging
    folder; the second publishes its run, the first is refused at publishing (it never replaces the other run)."""
    real_setup, calls = pipeline._setup, []

    def setup_with_a_second_run(recipe, work, *args, **kwargs):
        calls.append(work)
        if len(calls) == 1:
            second = run_clakit(*uptrain_args(paths))
            assert second.code == 0, second.err
            assert work.is_dir()  # the second run neither used nor removed the first one's staging folder
        return real_setup(recipe, work, *args, **kwargs)

    monkeypatch.setattr(pipeline, "_setup", setup_with_a_second_run)
    r = run_clakit(*uptrain_args(paths))
    assert r.code == 2 and "appeared while this run was working" in r.err, r.err
    assert len(calls) == 2 and calls[0] != calls[1]
    assert (tmp_path / "run" / "model" / "config.json").is_file()  # the second run's result, intact
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.")]


def test_uptrain_overwrite_of_an_older_clakits_run(paths, tmp_path):
    assert run_clakit(*uptrain_args(paths, "train.max_steps=2")).code == 0
    (tmp_path / "run" / MARKER).unlink()  # older clakit: run.json identifies the run
    r = run_clakit(*uptrain_args(paths, "train.max_steps=2", "--overwrite"))
    assert r.code == 0, r.err
    assert json.loads((tmp_path / "run" / MARKER).read_text())["kind"] == "uptrain"
    (tmp_path / "run" / ".model.k1ll3d_x.partial").mkdir()  # a result save killed midway: clakit's own leftover
    assert run_clakit(*uptrain_args(paths, "train.max_steps=2", "--overwrite")).code == 0


def test_uptrain_disk_full_while_saving_a_checkpoint_is_one_line(paths, tmp_path, monkeypatch, no_bars):
    """safetensors' own error for a full disk while writing checkpoint 4: one line; checkpoint 2 stays for --resume,
    the torn step-4 folder is not counted as a checkpoint."""
    from safetensors import SafetensorError

    from clakit.uptrain import checkpoint

    real_save, calls = checkpoint.save_file, []

    def full_at_the_second(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", full_at_the_second)
    r = run_clakit(*uptrain_args(paths))
    assert r.code == 2 and len(r.err_lines) == 1 and "Traceback" not in r.err, r.err
    assert "No space left on device (os error 28)" in r.err and "could not write checkpoint step-000004" in r.err
    assert "add --resume to the same command to continue from step-000002" in r.err
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path / "run")] == ["step-000002"]


def test_a_running_uptrain_is_neither_replaced_nor_resumed(paths, tmp_path):
    """While a run trains, its process holds the run folder: --overwrite and --resume from another are refused."""
    assert run_clakit(*uptrain_args(paths, "train.max_steps=2")).code == 0
    run = tmp_path / "run"
    with clakit.outputs.hold(run):  # stands in for the training process
        busy = "is in use by a running clakit process"
        assert_refused(uptrain_args(paths, "train.max_steps=2", "--overwrite"), busy, watch=[tmp_path])
        running = "is still running in another process"
        assert_refused(uptrain_args(paths, "train.max_steps=3", "--resume"), running, watch=[tmp_path])
    assert run_clakit(*uptrain_args(paths, "train.max_steps=2", "--overwrite")).code == 0  # released at its end


def test_a_full_disk_inside_safetensors_is_one_line(tmp_path):
    """safetensors reports a failed write as its own error, not an OSError: still one line naming the output."""
    from safetensors import SafetensorError

    from clakit.errors import ClakitError

    message = "Error while serializing: I/O error: No space left on device (os error 28)"
    with pytest.raises(ClakitError, match=r"^cannot write \S+/out: No space left on device \(os error 28\); check"):
        with clakit.outputs.staged(tmp_path / "out", "convert"):
            raise SafetensorError(message)
    assert list(tmp_path.iterdir()) == []


def _report_output(folder: Path) -> Path:
    """A clakit report folder (its marker and one file), which check_folder may replace."""
    folder.mkdir(parents=True)
    (folder / "report.md").write_text("# report\n")
    clakit.outputs.write_marker(folder, "report")
    return folder


def test_an_output_this_user_cannot_replace_is_refused_before_the_work(tmp_path, monkeypatch):
    """A read-only or immutable OUT (`chmod a-w`, `chattr +i`) given to be replaced passed the checks: with
    --overwrite the run exited 0 and left the whole old output hidden beside the new one (its removal failed
    silently), or was refused at the rename after all the work; so was another user's OUT in a sticky shared
    folder (/tmp), which only its owner may move. (Root ignores the permission bits: the refusals are simulated.)"""
    import tempfile

    out = _report_output(tmp_path / "shared" / "rep")
    real = tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):  # noqa: A002 (mkstemp's own keyword)
        if Path(dir) == out:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(clakit.outputs.tempfile, "mkstemp", read_only)
    with pytest.raises(clakit.outputs.ClakitError, match=r"rep cannot be replaced: its files cannot be removed "
                       r"\(Permission denied\); make it writable \(chmod -R u\+w"):  # fmt: skip
        clakit.outputs.check_folder(out, "report", overwrite=True)
    empty = tmp_path / "shared" / "empty"
    empty.mkdir()  # `mkdir -m 555`: its parent moves and removes it, no file inside is probed or removed
    assert clakit.outputs.check_folder(empty, "report", overwrite=True) == empty
    monkeypatch.setattr(clakit.outputs.tempfile, "mkstemp", real)
    empty.rmdir()
    # another process's probe inside OUT at this moment (the other ranks of a launch check it too) is not a user file
    probe = out / ".clakit-write-test.k3j4h5"
    probe.write_text("")
    assert clakit.outputs.check_folder(out, "report", overwrite=True) == out
    probe.unlink()
    (tmp_path / "shared").chmod(0o1777)
    monkeypatch.setattr(clakit.outputs.os, "geteuid", lambda: 12345)  # neither OUT's owner nor its folder's
    with pytest.raises(clakit.outputs.ClakitError, match="belongs to another user .* with the sticky bit"):
        clakit.outputs.check_folder(out, "report", overwrite=True)
    monkeypatch.setattr(clakit.outputs.os, "geteuid", lambda: out.stat().st_uid)  # its owner may
    assert clakit.outputs.check_folder(out, "report", overwrite=True) == out
    assert sorted(p.name for p in out.parent.iterdir()) == ["rep"]  # the probes left nothing


def test_a_replaced_output_that_cannot_be_removed_whole_is_named(tmp_path, monkeypatch, capsys):
    """The old output moved aside was removed with errors ignored: what could not be removed stayed hidden."""
    out = _report_output(tmp_path / "rep")
    new = _report_output(tmp_path / ".rep.12345678.partial")
    real = shutil.rmtree
    kept = lambda p, **k: None if str(p).endswith(".old") else real(p, **k)  # noqa: E731
    monkeypatch.setattr(clakit.outputs.shutil, "rmtree", kept)
    clakit.outputs.publish(new, out, "report", overwrite=True)
    (old,) = tmp_path.glob(".rep.*.old")
    assert f"the replaced rep could not be removed whole; what is left is in {old}" in capsys.readouterr().err
