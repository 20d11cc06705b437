"""Round 7: chains of commands, and the state one command leaves for the next. A user converts, uptrains, uptrains
the result again, evaluates, reports, moves folders between steps, and points one command at another's output.
Each test follows the records across such a chain: an output written inside another output (which that output's
--overwrite then deleted unseen), the KV saving of a moved source read from another folder of the same name, the
lineage of a model uptrained twice, a run folder or a training checkpoint given where a model is wanted."""

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from bad_input import run_clakit
from conftest import save_checkpoint, tiny_model
from uptrain_fixtures import tiny_recipe, write_recipe

from clakit.errors import ClakitError
from clakit.eval import evaluate
from clakit.markup import md_text
from clakit.outputs import MARKER
from clakit.uptrain import uptrain

EVAL_FLAGS = ("--seq-len", "32", "--max-tokens", "64", "--no-speed", "-q")


def _uptrain(root: Path, corpus_dir: Path, name: str, start: Path, steps: int) -> Path:
    """A tiny run from `start` (no distillation: no teacher needed); returns its run folder."""
    train = {"max_steps": steps, "save_steps": 1, "warmup_steps": 0}
    recipe = tiny_recipe(corpus_dir, root / name, model={"path": str(start)}, train=train)
    return uptrain(write_recipe(root / f"{name}.yaml", recipe), quiet=True).parent


@pytest.fixture(scope="module")
def chain(tiny_llama_checkpoint, corpus_dir, tmp_path_factory):
    """src -> `clakit convert` -> conv -> uptrain (3 steps) -> run1/model -> uptrain again (2 steps) -> run2/model."""
    root = tmp_path_factory.mktemp("chain")
    src = shutil.copytree(tiny_llama_checkpoint, root / "src")
    converted = run_clakit("convert", src, root / "conv", "-q")
    assert converted.code == 0, converted.err
    run1 = _uptrain(root, corpus_dir, "run1", root / "conv", 3)
    run2 = _uptrain(root, corpus_dir, "run2", run1 / "model", 2)
    return SimpleNamespace(root=root, src=src, conv=root / "conv", run1=run1, run2=run2, data=corpus_dir)


def _eval(model, out, data: Path, cwd=None):
    return run_clakit("eval", model, "-o", out, "--data", data / "heldout.txt", *EVAL_FLAGS, cwd=cwd)


def _refused(run, *expected: str) -> None:
    assert run.code == 2, (run.code, run.err)
    lines = run.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.err, run.err
    for text in expected:
        assert text in lines[0], lines[0]


# --- 1. an output inside another output ---------------------------------------------------------------------------


def test_an_eval_report_inside_a_run_is_refused_for_the_runs_overwrite_would_delete_it(chain, tmp_path):
    """`clakit eval RUN/model -o RUN/eval/mine.json` was written: a run's marker lists its top-level names only
    (eval, model, ...), so `clakit uptrain RECIPE --overwrite` later replaced the run and deleted the user's report
    without a word. Now refused in one line, before the evaluation; the same inside the model folder and inside a
    converted checkpoint (whose --overwrite it blocked)."""
    run = chain.run1
    before = sorted((run / "eval").iterdir())
    for inside, owner in ((run / "eval" / "mine.json", run), (run / "model" / "mine.json", run / "model"),
                          (chain.conv / "mine.json", chain.conv)):  # fmt: skip
        _refused(_eval(run / "model", inside, chain.data), f"is inside {owner}, a clakit ", "choose a folder outside")
        assert not inside.exists()
    assert sorted((run / "eval").iterdir()) == before
    outside = _eval(run / "model", tmp_path / "mine.json", chain.data)  # beside it: written
    assert outside.code == 0 and (tmp_path / "mine.json").is_file(), outside.err


def test_a_report_folder_inside_a_model_folder_is_refused(chain, tmp_path):
    """`clakit report ... -o RUN/model/compare` wrote a folder into the uptrained model (then a checkpoint holding a
    report folder, deleted with the run on --overwrite); refused like convert and uptrain outputs inside outputs."""
    reports = [chain.run1 / "eval" / f"{n}.json" for n in ("converted", "uptrained")]
    for inside in (chain.run1 / "model" / "compare", chain.conv / "compare"):
        _refused(run_clakit("report", *reports, "-o", inside), "is inside", "a clakit ")
        assert not inside.exists()
    assert run_clakit("report", *reports, "-o", tmp_path / "compare").code == 0


def test_the_demo_refuses_a_work_dir_inside_a_clakit_output_before_any_stage(chain, tmp_path):
    """`clakit demo --work-dir CONV/demo` wrote converted/, uptrain/, reports/ and demo.json into a converted
    checkpoint (then CONV's --overwrite refused: "holds files clakit did not write (demo)"); refused before the
    first stage (nothing is fetched, nothing written)."""
    from clakit.demo import DemoAssets, run_demo

    conv = shutil.copytree(chain.conv, tmp_path / "conv")
    ran = []
    stage = SimpleNamespace(name="probe", run=lambda ctx: ran.append(ctx))
    assets = DemoAssets(*(chain.data / f"{n}.txt" for n in ("calib", "calib", "train", "heldout")))
    for work in (conv / "demo", conv):
        with pytest.raises(ClakitError, match="is inside .*a clakit convert output"):
            run_demo(work, assets=assets, stages=[stage])
    assert not ran and not (conv / "demo").exists() and not (conv / "demo.json").exists()


# --- 2. records read back after a move ----------------------------------------------------------------------------


def test_the_kv_saving_of_a_moved_source_is_not_measured_against_another_folder_of_its_name(
    tiny_llama_checkpoint, corpus_dir, tmp_path
):
    """`clakit convert base conv` in a/, then base moved away: eval of conv from b/, which holds another model named
    base (same layers, width, heads and vocabulary, 4 KV heads instead of 2), measured the saving against b/base,
    the relative spec read from the wrong working directory: 4.0 for a 2x layout. The recorded spec is read from
    the conversion's working directory: gone there, the saving is the layout's, layers / producers."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_llama_checkpoint, a / "base")
    assert run_clakit("convert", "base", "conv", "-q", cwd=a).code == 0
    (a / "base").rename(a / "moved")
    save_checkpoint(tiny_model("llama", num_key_value_heads=4), _tokenizer(a / "moved"), b / "base")
    ran = _eval(a / "conv", b / "r.json", corpus_dir, cwd=b)
    assert ran.code == 0, ran.err
    kv = json.loads((b / "r.json").read_text())["kv_cache"]
    layout = json.loads((a / "conv" / "config.json").read_text())["kv_source_layers"]
    expected = len(layout) / sum(i == s for i, s in enumerate(layout))  # layers / producers
    assert kv["saving_factor"] == pytest.approx(expected), kv
    # where the source is still where the conversion read it, it is the reference (the same number here)
    (a / "moved").rename(a / "base")
    assert _eval(a / "conv", b / "r.json", corpus_dir, cwd=b).code == 0
    assert json.loads((b / "r.json").read_text())["kv_cache"]["saving_factor"] == pytest.approx(expected)


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_a_moved_converted_folder_evaluates_with_records_that_say_where_it_is_now(chain, tmp_path):
    """A converted folder renamed between steps: its report's origin names the record where it is now (and its
    sha256), the source the conversion read, and the report's Sources name the new path."""
    moved = shutil.copytree(chain.conv, tmp_path / "renamed")
    assert _eval(moved, tmp_path / "r.json", chain.data).code == 0
    prov = json.loads((tmp_path / "r.json").read_text())["provenance"]
    assert prov["model_path"] == str(moved) and prov["origin"]["record"] == str(moved / "clakit_convert.json")
    assert prov["origin"]["source_path"] == str(chain.src)
    assert run_clakit("report", tmp_path / "r.json", "-o", tmp_path / "rep").code == 0
    assert md_text(f"evaluated: {moved}") in (tmp_path / "rep" / "report.md").read_text()


# --- 3. a model uptrained twice -----------------------------------------------------------------------------------


def test_a_twice_uptrained_models_report_names_both_runs(chain, tmp_path):
    """run2 trained run1/model for 2 steps, run1 trained the conversion for 3. The report's origin held only the
    last run ("clakit uptrain (2 steps) of run1/model, clakit convert of src": the 3 steps before were nowhere,
    though uptrain.json keeps them as start_uptrain). Now origin.start_uptrain summarises the earlier run, and the
    Sources line names both runs, latest first, then the conversion."""
    report = evaluate(chain.run2 / "model", data=[str(chain.data / "heldout.txt")], seq_len=32, max_tokens=64,
                      speed=False, quiet=True)  # fmt: skip
    origin = report["provenance"]["origin"]
    earlier = json.loads((chain.run1 / "model" / "uptrain.json").read_text())
    assert origin["steps"] == 2 and origin["start_checkpoint"] == str(chain.run1 / "model")
    assert origin["start_uptrain"]["steps"] == earlier["steps"] == 3
    assert origin["start_uptrain"]["start_checkpoint"] == str(chain.conv)
    assert origin["start_uptrain"]["start_uptrain"] is None
    assert origin["conversion"]["source_path"] == str(chain.src)
    from clakit.eval.comparison import made_from

    assert made_from(origin) == (
        f"clakit uptrain (2 steps) of {chain.run1 / 'model'}, after clakit uptrain (3 steps) of {chain.conv}, "
        f"clakit convert (init mean; layout 0,0,2,2; {origin['conversion']['created']}) of {chain.src}"
    )


def test_a_report_says_when_an_uptrained_models_start_was_converted_again_since(chain, tmp_path):
    """convert -> uptrain -> `clakit convert ... --overwrite` into the same folder -> eval both -> report: the rows
    "conv" and "run/model" (made from "clakit uptrain of conv") read as this model, then trained, though the run
    started from the earlier conversion. The data note now says so, naming both records' times; a report of the
    same chain without the second conversion has no such note."""
    conv = tmp_path / "conv"
    assert run_clakit("convert", chain.src, conv, "-q").code == 0
    run = _uptrain(tmp_path, chain.data, "run", conv, 2)
    for name, model in (("conv", conv), ("up", run / "model")):
        assert _eval(model, tmp_path / f"{name}.json", chain.data).code == 0
    assert run_clakit("report", tmp_path / "conv.json", tmp_path / "up.json", "-o", tmp_path / "same").code == 0
    assert "not the model" not in (tmp_path / "same" / "report.md").read_text()
    again = run_clakit("convert", chain.src, conv, "--overwrite", "--factor", "4", "-q")
    assert again.code == 0, again.err
    assert _eval(conv, tmp_path / "conv.json", chain.data).code == 0
    assert run_clakit("report", tmp_path / "conv.json", tmp_path / "up.json", "-o", tmp_path / "rep").code == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    then = json.loads((run / "model" / "uptrain.json").read_text())["conversion"]["provenance"]["created"]
    now = json.loads((conv / "clakit_convert.json").read_text())["provenance"]["created"]
    # `then` and `now` may read the same second (the tiny chain runs in ~1 s): the runs differ by their commands
    expected = f"model was trained from {conv} as a run made it at {then}; the row conv is a later run's output in "
    assert expected + f"that folder (made at {now}), not the model model started from." in md, md
    assert "not the model model started from" in (tmp_path / "rep" / "report.html").read_text()


def test_a_report_of_models_with_other_tokenizers_says_why_the_same_files_differ(chain, tmp_path):
    """Two models of different tokenizers scored on the same file: the refusal said "num_tokens differs (...);
    evaluate every model on the same data with the same settings" (or "data.sha256 differs" where --max-tokens cut
    each at other text) to a user who had. It now says the same text became other tokens (bits/byte compares)."""
    assert _eval(chain.conv, tmp_path / "a.json", chain.data).code == 0
    a = json.loads((tmp_path / "a.json").read_text())
    other_tokens = {**a, "num_tokens": a["num_tokens"] + 7}  # the same text (same sha256), split otherwise
    other_text = {**a, "data": {**a["data"], "sha256": "0" * 64}}  # the same files, other text scored
    for name, report, expected in (
        ("b", other_tokens, "the models' tokenizers differ, so perplexity per token"),
        ("c", other_text, "the same files: they changed between the evaluations, or"),
    ):
        (tmp_path / f"{name}.json").write_text(json.dumps(report))
        _refused(run_clakit("report", tmp_path / "a.json", tmp_path / f"{name}.json", "-o", tmp_path / "rep"),
                 "cannot compare", expected)  # fmt: skip
    assert not (tmp_path / "rep").exists()


# --- 4. a run folder, or one of its checkpoints, where a model is wanted ------------------------------------------


def test_eval_of_a_run_folder_or_its_checkpoint_names_the_model_to_give(chain, tmp_path):
    """`clakit eval RUN` and `clakit eval RUN/checkpoints/step-N` (a run in progress: its latest checkpoint) said
    "is not a model checkpoint folder (no config.json); give the folder that holds the checkpoint's config.json and
    weights", and RUN/model of a run not finished "does not exist", naming nothing of the run. Now the line names
    RUN/model, and for a run that has not finished, how to finish it."""
    run = chain.run1
    step = sorted((run / "checkpoints").iterdir())[-1]
    for given in (run, run / "checkpoints", step):
        _refused(_eval(given, tmp_path / "r.json", chain.data), f"give the model it trained: {run / 'model'}")
    _refused(_eval(step, tmp_path / "r.json", chain.data), "a training checkpoint of a clakit uptrain run")
    unfinished = shutil.copytree(run, tmp_path / "unfinished")
    shutil.rmtree(unfinished / "model")  # as a run killed before its end, or still training
    for given in (unfinished / "checkpoints" / step.name, unfinished / "model"):  # model/: not there yet
        _refused(_eval(given, tmp_path / "r.json", chain.data),
                 "has not written its model yet (continue it with `clakit uptrain RECIPE --resume`)",
                 f"then give {unfinished / 'model'}")  # fmt: skip
    assert not (tmp_path / "r.json").exists()
    plain = tmp_path / "plain"
    plain.mkdir()  # any other folder without config.json: the general line, as before
    _refused(_eval(plain, tmp_path / "r.json", chain.data), "is not a model checkpoint folder (no config.json)")


def test_a_running_run_is_named_as_still_training(chain, tmp_path):
    """A run another process holds (training now): the line says so instead of suggesting --resume."""
    import fcntl

    unfinished = shutil.copytree(chain.run1, tmp_path / "live")
    shutil.rmtree(unfinished / "model")
    fd = os.open(unfinished / MARKER, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(ClakitError, match=r"has not written its model yet \(it is still training\)"):
            evaluate(unfinished, data=[str(chain.data / "heldout.txt")], seq_len=32, speed=False, quiet=True)
    finally:
        os.close(fd)


# --- 5. a model replaced (convert --overwrite) while it is evaluated ----------------------------------------------


def _evaluate(model, data: Path) -> dict:
    return evaluate(model, data=[str(data / "heldout.txt")], seq_len=32, max_tokens=64, speed=False, quiet=True)


def test_a_report_records_the_conversion_it_scored_not_one_published_while_it_scored(chain, tmp_path, monkeypatch):
    """provenance.origin was read after scoring (hours at 70B): a `clakit convert ... --overwrite` of MODEL
    published meanwhile gave the old model's numbers the new conversion's record (its layout, command, sha256).
    The record is now read with the weights."""
    import hashlib

    from clakit.eval import suite

    conv = shutil.copytree(chain.conv, tmp_path / "conv")
    scored = hashlib.sha256((conv / "clakit_convert.json").read_bytes()).hexdigest()
    measure = suite._perplexity

    def replaced_while_scoring(*args, **kwargs):
        again = run_clakit("convert", chain.src, conv, "--overwrite", "--factor", "4", "-q")
        assert again.code == 0, again.err
        return measure(*args, **kwargs)

    monkeypatch.setattr(suite, "_perplexity", replaced_while_scoring)
    origin = _evaluate(conv, chain.data)["provenance"]["origin"]
    assert origin["record_sha256"] == scored, "the report names the conversion published while it scored"
    assert json.loads((conv / "config.json").read_text())["kv_source_layers"] == [0, 0, 0, 0]  # replaced indeed


def test_a_model_replaced_while_its_weights_load_is_refused(chain, tmp_path, monkeypatch):
    """Config and tokenizer are read first, the weights shard by shard after: a `convert --overwrite` publishing in
    between gave a report of config, tokenizer and weights from two models, without a word. Now one line."""
    import clakit.sources

    conv = shutil.copytree(chain.conv, tmp_path / "conv")
    load = clakit.sources.load_model

    def replaced_while_loading(*args, **kwargs):
        assert run_clakit("convert", chain.src, conv, "--overwrite", "--factor", "4", "-q").code == 0
        return load(*args, **kwargs)

    monkeypatch.setattr(clakit.sources, "load_model", replaced_while_loading)
    with pytest.raises(ClakitError, match=r"was replaced while it was read .*evaluate it again"):
        _evaluate(conv, chain.data)
    monkeypatch.setattr(clakit.sources, "load_model", load)
    assert _evaluate(conv, chain.data)["kv_cache"]["producer_layers"] == 1  # unreplaced: evaluated as it is now


def test_a_model_replaced_so_that_its_load_fails_is_called_replaced_not_damaged(chain, tmp_path, monkeypatch):
    """A `convert --overwrite` publishing while the weights load removes the shards being read: the load failed
    with "No such file ...; check that its files are complete (download it again)" for a checkpoint that is fine.
    The folder's identity is checked when the load fails too: one line saying it was replaced."""
    import clakit.sources

    conv = shutil.copytree(chain.conv, tmp_path / "conv")

    def replaced_then_failed(*args, **kwargs):
        assert run_clakit("convert", chain.src, conv, "--overwrite", "--factor", "4", "-q").code == 0
        raise ClakitError(f"cannot load as a causal LM {conv}: No such file or directory; check that its files are "
                          "complete (download it again)")  # fmt: skip

    monkeypatch.setattr(clakit.sources, "load_model", replaced_then_failed)
    with pytest.raises(ClakitError, match=r"was replaced while it was read .*evaluate it again"):
        _evaluate(conv, chain.data)


# --- 6. the demo as a chain: a rerun redoes what changed, and only that -------------------------------------------


def test_a_demo_rerun_keeps_the_stages_whose_inputs_settings_and_code_are_unchanged(
    tiny_llama_checkpoint, corpus_dir, tmp_path, monkeypatch
):
    """A rerun of the demo converted and uptrained again whatever had changed (the real demo: 762 s of conversion
    and 677 s of uptraining each time; on the tiny model here, after deleting only reports/, the conversion ran
    again). Now a stage is kept when demo.json recorded the same key (clakit's code, the settings and input files
    it reads, the run_id of the conversion it starts from) and its output still carries the run_id recorded; a
    changed setting redoes that stage and what follows, a rewritten input file its stage and what follows."""
    import clakit.convert
    import clakit.uptrain
    from clakit.demo import DemoAssets, DemoSettings, run_demo

    calls = []
    convert, train = clakit.convert.convert, clakit.uptrain.uptrain

    def quick_convert(src, out, **kwargs):  # the tiny model's default conversion, without the slow fits
        calls.append("convert")
        return convert(src, out, factor=2, overwrite=True, quiet=True)

    def counted_uptrain(*args, **kwargs):
        calls.append("uptrain")
        return train(*args, **kwargs)

    monkeypatch.setattr(clakit.convert, "convert", quick_convert)
    monkeypatch.setattr(clakit.uptrain, "uptrain", counted_uptrain)
    calib = shutil.copy(corpus_dir / "calib.txt", tmp_path / "calib.txt")
    assets = DemoAssets(tiny_llama_checkpoint, Path(calib), corpus_dir / "train.txt", corpus_dir / "heldout.txt")
    tiny = dict(calib_tokens=512, seq_len=32, max_tokens=256, batch_size=2, decode_steps=2, uptrain_steps=2,
                uptrain_seq_len=64, quiet=True)  # fmt: skip
    work = tmp_path / "work"

    def demo(**changed) -> dict:
        calls.clear()
        run_demo(work, assets=assets, settings=DemoSettings(**{**tiny, **changed}))
        return json.loads((work / "demo.json").read_text())

    assert demo()["reused"] == [] and calls == ["convert", "uptrain"]
    shutil.rmtree(work / "reports")  # an intermediate deleted: only what reads it again runs
    summary = demo()
    assert (summary["reused"], calls) == (["convert", "uptrain"], []), calls
    assert summary["finished"] and (work / "reports" / "uptrained.json").is_file()
    assert list(summary["models"]) == ["original", "converted", "uptrained"]
    assert (work / "report" / "report.md").is_file()
    assert (demo(uptrain_steps=3)["reused"], calls) == (["convert"], ["uptrain"])  # a changed setting
    Path(calib).write_text(Path(calib).read_text())  # rewritten (same text, new mtime): not known to be the same
    assert (demo(uptrain_steps=3)["reused"], calls) == ([], ["convert", "uptrain"])
    convert(tiny_llama_checkpoint, work / "converted", factor=2, overwrite=True, quiet=True)  # by the user, between
    assert (demo(uptrain_steps=3)["reused"], calls) == ([], ["convert", "uptrain"])  # another run's output there
    # an output damaged since (its run_id still there): a weight file edited in place (same size) or removed is
    # redone, never kept and reported on (before: the edited weights were kept, a removed one failed the eval)
    weights = sorted((work / "converted").glob("*.safetensors"))[0]
    with open(weights, "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    assert (demo(uptrain_steps=3)["reused"], calls) == ([], ["convert", "uptrain"])
    next((work / "uptrain" / "model").glob("*.safetensors")).unlink()
    assert (demo(uptrain_steps=3)["reused"], calls) == (["convert"], ["uptrain"])
    assert (demo(uptrain_steps=3)["reused"], calls) == (["convert", "uptrain"], [])  # and kept once redone
    # a run without uptraining forgot the earlier one's record: the next run uptrained again (~11 min on SmolLM2)
    assert (demo(uptrain_steps=0)["reused"], calls) == (["convert"], [])
    assert (demo(uptrain_steps=3)["reused"], calls) == (["convert", "uptrain"], [])


def test_a_second_demo_in_the_same_work_dir_is_refused_while_the_first_runs(corpus_dir, tmp_path):
    """Two `clakit demo` in one --work-dir (two terminals) both passed the output checks and ran every stage (by the
    code: each converts with overwrite=True, so the second's conversion could replace the one the first uptrains
    from; not timed here). While a demo holds the folder, another is refused in one line before its first stage."""
    import fcntl

    from clakit.demo import DemoAssets, run_demo

    work = tmp_path / "work"
    work.mkdir()
    ran = []
    stage = SimpleNamespace(name="probe", run=lambda ctx: ran.append(ctx))
    assets = DemoAssets(*(corpus_dir / f"{n}.txt" for n in ("calib", "calib", "train", "heldout")))
    fd = os.open(work, os.O_RDONLY)  # the first demo
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(ClakitError, match="is in use by another clakit demo"):
            run_demo(work, assets=assets, stages=[stage])
        assert not ran and list(work.iterdir()) == []
    finally:
        os.close(fd)
    run_demo(work, assets=assets, stages=[stage])  # once it has ended
    assert len(ran) == 1 and json.loads((work / "demo.json").read_text())["finished"]


def test_a_demo_reads_the_earlier_records_only_once_it_holds_its_work_dir(corpus_dir, tmp_path, monkeypatch):
    """demo.json was read before the lock: a demo that waited out another one in the same --work-dir judged its
    reuse by what was there before the other one ran."""
    import fcntl

    from clakit.demo import DemoAssets, pipeline, run_demo

    work = tmp_path / "work"
    held_when_read = []
    read = pipeline._earlier_stages

    def earlier(folder):
        fd = os.open(folder, os.O_RDONLY)  # as another demo would try it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held_when_read.append(False)
        except BlockingIOError:
            held_when_read.append(True)
        finally:
            os.close(fd)
        return read(folder)

    monkeypatch.setattr(pipeline, "_earlier_stages", earlier)
    assets = DemoAssets(*(corpus_dir / f"{n}.txt" for n in ("calib", "calib", "train", "heldout")))
    run_demo(work, assets=assets, stages=[SimpleNamespace(name="probe", run=lambda ctx: None)])
    assert held_when_read == [True]


def test_a_resume_whose_start_checkpoint_was_converted_again_is_refused(tokenizer, corpus_dir, tmp_path, capsys):
    """convert A into conv, uptrain from conv killed at step 2, `clakit convert B conv --overwrite`, then --resume:
    the resume loaded B's weights and merged the saved training (of A) into them, exit 0, the result B's embeddings
    (helper C's probe: 'embed == srcA's: False == srcB's: True'). run.json now records the start's summary and the
    resume is refused in one line, the run folder as it was."""
    from uptrain_fixtures import killed_at_step

    from clakit.cli import main

    for name, seed in (("a", 0), ("b", 1)):
        save_checkpoint(tiny_model("llama", seed=seed), tokenizer, tmp_path / name)
    assert main(["convert", str(tmp_path / "a"), str(tmp_path / "conv"), "-q"]) == 0
    recipe = tiny_recipe(corpus_dir, tmp_path / "run", model={"path": str(tmp_path / "conv")},
                         train={"max_steps": 4, "save_steps": 1, "warmup_steps": 0})  # fmt: skip
    path = write_recipe(tmp_path / "r.yaml", recipe)
    killed_at_step(2, path)
    before = sorted(p.relative_to(tmp_path / "run") for p in (tmp_path / "run").rglob("*"))
    assert main(["convert", str(tmp_path / "b"), str(tmp_path / "conv"), "--overwrite", "-q"]) == 0
    capsys.readouterr()
    assert main(["uptrain", str(path), "--resume", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "whose config or weights have changed since" in err[0], err
    assert sorted(p.relative_to(tmp_path / "run") for p in (tmp_path / "run").rglob("*")) == before


def test_convert_and_uptrain_of_a_run_folder_name_the_model_to_give(chain, tmp_path, capsys):
    """`clakit convert RUN OUT` and an uptrain with model.path=RUN (or RUN/checkpoints/step-N) said "is not a model
    checkpoint folder (no config.json); give the folder that holds...", naming nothing of the run (helper C, round 7;
    eval was fixed then). sources names RUN/model now, as eval does."""
    from clakit.cli import main

    run = chain.run1
    step = sorted((run / "checkpoints").iterdir())[-1]
    for given in (run, step):
        assert main(["convert", str(given), str(tmp_path / "out"), "-q"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"give the model it trained: {run / 'model'}" in err[0], err
        recipe = tiny_recipe(chain.data, tmp_path / "up", model={"path": str(given)})
        assert main(["uptrain", str(write_recipe(tmp_path / "r.yaml", recipe)), "-q"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"give the model it trained: {run / 'model'}" in err[0], err
    assert not (tmp_path / "out").exists() and not (tmp_path / "up").exists()
