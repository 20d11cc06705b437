"""Round 5 of eval/report/uptrain: every record clakit writes reads back in the code that reads it. Settings
dataclasses rebuild from their own records (old ones too); `clakit report` compares passkey settings as recorded;
uptrain's own reports name the run that made each model; a chained uptrain nests the earlier card under its own
headings; a run's identity is the files its paths name, not how they were typed; the data digest is computed once;
the distillation default the machine chose is recorded."""

import dataclasses
import json
import os
import re
import shutil
import typing
from pathlib import Path

import pytest
from uptrain_fixtures import tiny_cla_checkpoint, tiny_recipe, write_recipe  # noqa: F401

from clakit.errors import ClakitError
from clakit.eval import evaluate
from clakit.eval.config import EvalConfig
from clakit.eval.passkey import PasskeySettings
from clakit.uptrain import uptrain
from clakit.uptrain.recipe import DataSection, DistillSection, LoraSection, ModelSection, Recipe, TrainSection

SETTINGS = dict(seq_len=32, max_tokens=256, batch_size=2, speed=False)


# --- one run converting model.source on the fly, from relative paths --------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tiny_llama_checkpoint, corpus_dir, tmp_path_factory):
    """model.source converted in the run (calibrated, distill_steps left null on a machine made to look too small
    for the end-to-end distillation), relative paths typed in a working folder. Returns (work folder, run folder)."""
    from clakit.convert import pipeline as convert_pipeline

    work = tmp_path_factory.mktemp("work")
    shutil.copytree(tiny_llama_checkpoint, work / "src")
    for name in ("train.txt", "heldout.txt", "calib.txt"):
        shutil.copy(corpus_dir / name, work / name)
    convert = {"kv_source_layers": [0, 0, 2, 2], "init": "calibrated", "calib_data": ["calib.txt"]}
    convert |= {"calib_tokens": 256, "seq_len": 32}
    recipe = tiny_recipe(
        Path("."),
        Path("runs/a"),
        model={"source": "src", "convert": convert},
        data={"train": ["train.txt"], "eval": ["heldout.txt"]},
        train={"max_steps": 3, "save_steps": 1, "warmup_steps": 0},
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setattr(convert_pipeline, "_free_memory", lambda device: 1)  # 1 byte free: the default is skipped
        uptrain(write_recipe(work / "r.yaml", recipe), quiet=True)
    return work, work / "runs" / "a"


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


# --- 1. settings dataclasses rebuild from their records ------------------------------------------------------------


def _defaults(cls) -> dict:
    return {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}


def _sections(cls):
    """cls and every settings dataclass nested in it (Recipe's sections)."""
    yield cls
    for tp in typing.get_type_hints(cls).values():
        for inner in (tp, *typing.get_args(tp)):
            if dataclasses.is_dataclass(inner) and inner.__module__.startswith("clakit.uptrain"):
                yield from _sections(inner)


def test_every_settings_dataclass_rebuilds_from_its_own_record_old_ones_included(run_dir, corpus_dir, tmp_path):
    """EvalConfig from report.json's provenance.config, PasskeySettings from passkey.settings (it holds the derived
    new_tokens: `PasskeySettings(**record)` raised TypeError), the Recipe and each of its sections from run.json's
    and uptrain.json's recipe. A record from before a field existed (each field dropped in turn) rebuilds with that
    field's default; a key no field has is one line naming it."""
    shutil.copy(corpus_dir / "heldout.txt", tmp_path / "held.txt")
    _, run = run_dir
    passkey = PasskeySettings(lengths=[200], depths=[0, 1], samples=1, seed=3)
    report = evaluate(run / "model", data=[str(tmp_path / "held.txt")], passkey=passkey, quiet=True, **SETTINGS)
    written = {
        EvalConfig: (report["provenance"]["config"], EvalConfig.from_record),
        PasskeySettings: (report["passkey"]["settings"], PasskeySettings.from_record),
        Recipe: (_read(run / "run.json")["recipe"], Recipe.from_record),
    }
    assert _read(run / "model" / "uptrain.json")["recipe"] == written[Recipe][0]
    for cls, (record, rebuild) in written.items():
        rebuilt = rebuild(record)
        assert isinstance(rebuilt, cls)
        kept = {k: v for k, v in record.items() if k != "new_tokens"}
        assert json.loads(json.dumps(dataclasses.asdict(rebuilt))) == kept, cls
        for name in kept:  # a record written before the field `name` existed
            older = {k: v for k, v in record.items() if k != name}
            assert getattr(rebuild(older), name) == _defaults(cls)[name], (cls, name)
        with pytest.raises(ClakitError, match="from_the_future.*(no field|valid keys)"):
            rebuild({**record, "from_the_future": 1})
    recipe = written[Recipe][0]
    for cls in (ModelSection, DataSection, TrainSection, LoraSection, DistillSection):
        assert cls in set(_sections(Recipe))
        section = next(k for k, v in typing.get_type_hints(Recipe).items() if v is cls)
        for name in recipe[section]:
            older = {**recipe, section: {k: v for k, v in recipe[section].items() if k != name}}
            assert getattr(getattr(Recipe.from_record(older), section), name) == _defaults(cls)[name], name


def test_a_passkey_report_replays_from_its_recorded_settings(run_dir, corpus_dir, tmp_path):
    """The passkey settings a report recorded ask the same prompts again, through from_record."""
    shutil.copy(corpus_dir / "heldout.txt", tmp_path / "held.txt")
    _, run = run_dir
    data = [str(tmp_path / "held.txt")]
    first = evaluate(run / "model", data=data, passkey=PasskeySettings(lengths=[200], depths=[0.5]), quiet=True,
                     **SETTINGS)  # fmt: skip
    again = evaluate(run / "model", EvalConfig.from_record(first["provenance"]["config"]),
                     passkey=PasskeySettings.from_record(first["passkey"]["settings"]), quiet=True)  # fmt: skip
    assert again["passkey"]["prompts"] == first["passkey"]["prompts"]


# --- 2. passkey depths 0 vs 0.0 ------------------------------------------------------------------------------------


def _passkey_report(depths: list, seed: int = 0) -> dict:
    cells = [{"length": 300, "depth": d, "accuracy": 0.5, "correct": 1, "samples": 2} for d in depths]
    return {
        "model": "m",
        "perplexity": 10.0,
        "bits_per_byte": 1.0,
        "num_tokens": 100,
        "word_perplexity": 20.0,
        "nll_per_token": 2.3,
        "data": {"sources": ["a.txt"], "sha256": "a" * 64},
        "settings": {"seq_len": 32, "stride": 32, "max_tokens": None, "batch_size": 1},
        "kv_cache": {"bytes_per_token": 100, "saving_factor": None},
        "provenance": {"clakit": "x"},
        "passkey": {
            "accuracy": 0.5,
            "cells": cells,
            "settings": {"lengths": [300], "depths": depths, "samples": 2, "seed": seed, "new_tokens": 8},
        },
    }


def test_old_passkey_depths_written_0_and_new_ones_written_0_0_are_other_prompts():
    """A depth is part of its prompts' seed string: clakit before unique_depths recorded [0, 1] as given, whose
    prompts (keys, filler) differ from [0.0, 1.0]'s. `[0, 1] == [0.0, 1.0]` in Python, so check_comparable let
    the two reports be compared as the same prompts; now it refuses, saying why."""
    from conftest import build_tokenizer, make_text

    from clakit.eval.comparison import check_comparable
    from clakit.eval.passkey import PromptBuilder

    builder = PromptBuilder(build_tokenizer(), make_text(3000, 1), 300)
    assert builder.build(300, 0, 0, 0).key != builder.build(300, 0.0, 0, 0).key  # other prompts indeed
    old, new = _passkey_report([0, 1]), _passkey_report([0.0, 1.0])
    why = r"passkey\.settings differs .*written differently, e\.g\. a passkey depth 0 vs 0\.0"
    with pytest.raises(ClakitError, match=why):
        check_comparable([new, old], ["new.json", "old.json"])
    check_comparable([new, _passkey_report([0.0, 1.0])], ["a.json", "b.json"])  # the same prompts: compared


def test_the_report_says_which_prompts_its_passkey_accuracies_compare():
    from clakit.eval.comparison import markdown

    text = markdown([_passkey_report([0.0, 0.5]), _passkey_report([0.0, 0.5])])
    assert "Passkey prompts: lengths 300 tokens, depths 0.0, 0.5, 2 samples per cell, seed 0" in text


# --- 3. uptrain's own reports name the run that made each model ---------------------------------------------------


def test_uptrains_reports_and_page_name_the_run_that_made_each_model(run_dir):
    """eval/converted.json and eval/uptrained.json held provenance.origin null (the models were scored in memory),
    so the run's own report page said "made from –" though the run knows both; now their origin is what `clakit
    eval` of the folder records: the conversion record in the published run, the uptrain.json of model/."""
    from clakit.eval.lineage import origin

    _, run = run_dir
    converted, uptrained = (
        _read(run / "eval" / f"{n}.json")["provenance"]["origin"] for n in ("converted", "uptrained")
    )
    assert converted == origin(run / "converted")
    assert uptrained == origin(run / "model")
    assert Path(uptrained["record"]) == run / "model" / "uptrain.json" and Path(converted["record"]).is_file()
    assert _read(run / "eval" / "original.json")["provenance"]["origin"] is None  # the stock model: made by no run
    page = (run / "report" / "report.md").read_text()
    assert page.count("made from: clakit convert (init ") == 1, page  # its init, layout and time, then the source
    assert page.count("made from: clakit uptrain (3 steps) of ") == 1, page


# --- 4. a chained uptrain nests the earlier card under its headings ------------------------------------------------


def _headings(card: str) -> list[str]:
    text = re.sub(r"```.*?```", "", card, flags=re.S)
    return [line for line in text.splitlines() if re.match(r"#{1,6} ", line)]


def test_an_uptrained_model_uptrained_again_demotes_the_earlier_cards_headings(run_dir, corpus_dir, tmp_path):
    """The second card held the first one's `# CLA model, uptrained with clakit` and `## Recipe` at their levels:
    two titles, two Recipe sections at one level. Now the card has one `# ` title and the nested card's headings
    sit below `## Start checkpoint (uptrained before)`."""
    _, run = run_dir
    sections = {"model": {"path": str(run / "model")}, "train": {"max_steps": 1, "save_steps": 0, "warmup_steps": 0}}
    out = uptrain(write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus_dir, tmp_path / "run", **sections)), quiet=True)
    headings = _headings((out / "README.md").read_text())
    assert [h for h in headings if h.startswith("# ")] == ["# CLA model, uptrained with clakit"], headings
    nested = headings[headings.index("## Start checkpoint (uptrained before)") + 1 :]
    assert nested and all(h.startswith("### ") or h.startswith("####") for h in nested), nested
    assert "### CLA model, uptrained with clakit" in nested and "#### Conversion" in nested
    from clakit.uptrain.card import demoted

    assert demoted("```\n# a comment\n```\n#tag\n###### deep") == "```\n# a comment\n```\n#tag\n###### deep"


# --- 5. a run's identity: the files its paths name -----------------------------------------------------------------


def _killed_run(tmp_path, corpus_dir, start) -> tuple[Path, dict]:
    from uptrain_fixtures import killed_at_step

    work = tmp_path / "work"
    work.mkdir()
    for name in ("train.txt", "heldout.txt"):
        shutil.copy(corpus_dir / name, work / name)
    recipe = tiny_recipe(Path("."), Path("runs/r"), model={"path": str(start)},
                         data={"train": ["train.txt"], "eval": ["heldout.txt"]})  # fmt: skip
    os.chdir(work)
    killed_at_step(2, write_recipe(work / "r.yaml", recipe))
    return work, recipe


def test_a_run_started_with_relative_paths_resumes_with_absolute_ones_from_elsewhere(
    tmp_path,
    corpus_dir,
    tiny_cla_checkpoint,  # noqa: F811
    monkeypatch,
):
    """The fingerprint hashed the paths as typed: `data.train=[train.txt]` started in work/ refused --resume given
    `[work/train.txt]` absolute, from another folder ("was started with a different recipe"). A run's identity is
    now its settings and what it read: the text by its tokens (data_sha256), wherever its files are."""
    monkeypatch.chdir(tmp_path)
    work, recipe = _killed_run(tmp_path, corpus_dir, tiny_cla_checkpoint)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    data = {**recipe["data"], "train": [str(work / "train.txt")], "eval": [str(work / "heldout.txt")]}
    absolute = {**recipe, "data": data, "train": {**recipe["train"], "output_dir": str(work / "runs/r")}}
    out = uptrain(write_recipe(elsewhere / "abs.yaml", absolute), resume=True, quiet=True)
    assert (out / "config.json").is_file()
    assert _read(out / "uptrain.json")["fingerprint"] == _read(work / "runs/r/run.json")["fingerprint"]


def test_a_moved_run_resumes_and_other_text_under_the_same_names_is_refused(
    tmp_path,
    corpus_dir,
    tiny_cla_checkpoint,  # noqa: F811
    monkeypatch,
):
    """The project (run folder and its text) moved elsewhere resumes with its relative recipe; the same names
    holding other text are refused by their tokens, and where tokens cannot be compared (a run.json without their
    digest) by the files, resolved from the folder each recipe was typed in."""
    monkeypatch.chdir(tmp_path)
    work, _ = _killed_run(tmp_path, corpus_dir, tiny_cla_checkpoint)
    moved = shutil.copytree(work, tmp_path / "moved")
    monkeypatch.chdir(moved)
    assert (uptrain(moved / "r.yaml", resume=True, quiet=True) / "config.json").is_file()
    other = shutil.copytree(work, tmp_path / "other")
    (other / "train.txt").write_text((corpus_dir / "calib.txt").read_text())  # the same name, other text
    monkeypatch.chdir(other)
    with pytest.raises(ClakitError, match="training or held-out text changed"):
        uptrain(other / "r.yaml", resume=True, quiet=True)
    record = _read(other / "runs/r/run.json")
    # a run.json of an earlier clakit, without the tokens' digest: its files are compared (a resume on another number
    # of processes reads to the same budget now, so its tokens are compared: trainer.step_shape)
    (other / "runs/r/run.json").write_text(json.dumps({k: v for k, v in record.items() if k != "data_sha256"}))
    with pytest.raises(ClakitError, match=r"read other files \(data\.train: \[.*/work/train\.txt'\] -> \[.*/other/"):
        uptrain(other / "r.yaml", resume=True, quiet=True)


def test_a_run_recorded_with_the_typed_fingerprint_still_resumes(
    tmp_path,
    corpus_dir,
    tiny_cla_checkpoint,  # noqa: F811
    monkeypatch,
):
    """A run.json written before (its fingerprint of the paths as typed, a key added since missing from its recipe)
    resumes with the same recipe: the recorded recipe is compared through Recipe.from_record and its cwd."""
    monkeypatch.chdir(tmp_path)
    work, recipe = _killed_run(tmp_path, corpus_dir, tiny_cla_checkpoint)
    record = _read(work / "runs/r/run.json")
    record["fingerprint"] = "0123456789abcdef"  # whatever an older clakit hashed
    del record["recipe"]["data"]["copy_span"]  # a key added later: the default, as the recorded run had it
    (work / "runs/r/run.json").write_text(json.dumps(record))
    monkeypatch.chdir(work)
    out = uptrain(work / "r.yaml", resume=True, quiet=True)
    assert (out / "config.json").is_file()


# --- 6. the data digest, once --------------------------------------------------------------------------------------


def test_the_data_digest_is_computed_once_per_run(tmp_path, corpus_dir, tiny_cla_checkpoint, monkeypatch):  # noqa: F811
    """sha256 of every packed block: run.json's at the start and uptrain.json's at the end were two computations of
    one value (a second pass over the tokens of a large run)."""
    from clakit.uptrain import pipeline

    calls, real = [], pipeline.data_digest
    monkeypatch.setattr(pipeline, "data_digest", lambda data: calls.append(1) or real(data))
    recipe = tiny_recipe(corpus_dir, tmp_path / "run", model={"path": str(tiny_cla_checkpoint)},
                         train={"max_steps": 1, "save_steps": 0, "warmup_steps": 0})  # fmt: skip
    out = uptrain(write_recipe(tmp_path / "r.yaml", recipe), quiet=True)
    assert len(calls) == 1
    assert _read(out / "uptrain.json")["data_sha256"] == _read(tmp_path / "run" / "run.json")["data_sha256"]


# --- 7. the distillation default the machine chose ----------------------------------------------------------------


def test_the_distillation_steps_the_machine_chose_are_recorded_with_why(run_dir):
    """model.convert.distill_steps null: the conversion distils its default where the whole student fits free
    memory (MemAvailable on CPU), else 0, so the same recipe converts differently on another machine. run.json,
    uptrain.json and the card record the value it came to and why, and how to pin it."""
    _, run = run_dir
    assert _read(run / "run.json")["recipe"]["model"]["convert"]["distill_steps"] is None
    assert _read(run / "converted" / "clakit_convert.json")["settings"]["distill_steps"] == 0
    for record in (_read(run / "run.json"), _read(run / "model" / "uptrain.json")):
        resolved = record["resolved"]["model.convert.distill_steps"]
        assert resolved["value"] == 0
        assert "did not fit the device's free memory" in resolved["why"]
        assert "model.convert.distill_steps=N" in resolved["why"]
    assert (
        "- model.convert.distill_steps: 0 (0: the default (50) was skipped"
        in (run / "model" / "README.md").read_text()
    )


def test_the_conversion_records_why_it_skipped_its_default_distillation(run_dir):
    """The converter skipped its default distillation where the student did not fit free memory, and where no
    layer shares K/V, saying so on stderr only: its clakit_convert.json had distill null, so readers (uptrain's
    resolved keys, the demo) guessed the reason from the settings. The record now says why, with the bytes."""
    _, run = run_dir
    distill = _read(run / "converted" / "clakit_convert.json")["distill"]
    assert distill["steps"] == 0 and distill["need_bytes"] > distill["free_bytes"], distill
    assert distill["skipped"].startswith("the whole student did not fit the device's free memory (~"), distill
    why = _read(run / "run.json")["resolved"]["model.convert.distill_steps"]["why"]
    assert distill["skipped"] in why


def test_two_uptrain_runs_reports_are_told_apart_by_the_run_that_made_them(run_dir):
    """uptrain scores its models in memory: every run's eval/uptrained.json has model "uptrained" and, started from
    one folder, one cwd, so `clakit report runs/a/eval/uptrained.json runs/b/eval/uptrained.json` labelled them
    "uptrained (1)" and "uptrained (2)". The origin now recorded places each in its run: a/uptrained, b/uptrained;
    one run's own page keeps original, converted, uptrained."""
    from clakit.eval import read_report
    from clakit.eval.comparison import labels

    _, run = run_dir
    first = read_report(run / "eval" / "uptrained.json")
    second = json.loads(json.dumps(first))
    second["provenance"]["origin"]["record"] = str(run.parent / "b" / "model" / "uptrain.json")
    assert labels([first, second]) == ["a/uptrained", "b/uptrained"]
    own = [read_report(run / "eval" / f"{n}.json") for n in ("original", "converted", "uptrained")]
    assert labels(own) == ["original", "converted", "uptrained"]


def test_the_demo_records_the_distillation_steps_its_machine_chose(tmp_path, tiny_llama_checkpoint, corpus_dir):
    """The demo converts at the converter's default distillation, skipped where the student does not fit free
    memory (a note on stderr only): demo.json did not say which the run got. It records the value and why."""
    from clakit.convert import pipeline as convert_pipeline
    from clakit.demo import pipeline as demo

    assets = demo.DemoAssets(tiny_llama_checkpoint, corpus_dir / "calib.txt", corpus_dir / "train.txt",
                             corpus_dir / "heldout.txt")  # fmt: skip
    settings = demo.DemoSettings(calib_tokens=512, seq_len=32, max_tokens=400, batch_size=2, decode_steps=2,
                                 uptrain_steps=0, quiet=True)  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(convert_pipeline, "_free_memory", lambda device: 1)
        demo.run_demo(tmp_path / "work", assets=assets, settings=settings)
    resolved = _read(tmp_path / "work" / "demo.json")["resolved"]["convert.distill_steps"]
    converted = _read(tmp_path / "work" / "converted" / "clakit_convert.json")
    assert resolved["value"] == converted["settings"]["distill_steps"] == 0
    assert "did not fit the device's free memory" in resolved["why"] and "--distill-steps N" in resolved["why"]


def test_a_resume_naming_another_start_checkpoint_is_refused(
    tmp_path,
    corpus_dir,
    tiny_cla_checkpoint,  # noqa: F811
    monkeypatch,
):
    """639f522 left model.path out of the fingerprint (a moved project must resume), so --resume with a recipe naming
    another checkpoint silently trained on (and merged the saved LoRA into) the recorded one. A model.path naming a
    checkpoint whose weights differ from the recorded start (a fine-tune of the same shapes) is refused; the same
    checkpoint copied elsewhere resumes."""
    from safetensors.torch import load_file, save_file

    monkeypatch.chdir(tmp_path)
    work, recipe = _killed_run(tmp_path, corpus_dir, tiny_cla_checkpoint)
    copy = shutil.copytree(tiny_cla_checkpoint, tmp_path / "copy")
    other = shutil.copytree(tiny_cla_checkpoint, tmp_path / "other")
    shard = next(other.glob("model-*.safetensors"))
    save_file({k: v + 1 for k, v in load_file(shard).items()}, shard, metadata={"format": "pt"})
    write_recipe(work / "r.yaml", recipe | {"model": {"path": str(other)}})
    with pytest.raises(ClakitError, match=r"--resume: .* started from .*; model\.path now names .*other"):
        uptrain(work / "r.yaml", resume=True, quiet=True)
    write_recipe(work / "r.yaml", recipe | {"model": {"path": str(copy)}})
    assert (uptrain(work / "r.yaml", resume=True, quiet=True) / "config.json").is_file()


def test_a_resume_naming_another_source_model_is_refused(tmp_path, corpus_dir, tokenizer, monkeypatch):
    """model.source is outside the fingerprint too (639f522): --resume with a recipe naming another stock model
    silently continued on the run's conversion of the first. Refused where the given source is another checkpoint
    than the one the conversion recorded; a copy of it resumes."""
    from conftest import save_checkpoint, tiny_model
    from uptrain_fixtures import killed_at_step

    first = save_checkpoint(tiny_model("llama"), tokenizer, tmp_path / "first")
    other = save_checkpoint(tiny_model("llama", seed=1), tokenizer, tmp_path / "other")
    copy = shutil.copytree(first, tmp_path / "copy")
    model = {"source": str(first), "convert": {"factor": 2, "init": "mean"}}
    recipe = tiny_recipe(corpus_dir, tmp_path / "run", model=model)
    killed_at_step(2, write_recipe(tmp_path / "r.yaml", recipe))
    write_recipe(tmp_path / "r.yaml", recipe | {"model": model | {"source": str(other)}})
    with pytest.raises(ClakitError, match=r"--resume: .* started from .*first; model\.source now names .*other"):
        uptrain(tmp_path / "r.yaml", resume=True, quiet=True)
    write_recipe(tmp_path / "r.yaml", recipe | {"model": model | {"source": str(copy)}})
    assert (uptrain(tmp_path / "r.yaml", resume=True, quiet=True) / "config.json").is_file()


def test_a_resume_naming_other_calibration_text_is_refused(tmp_path, corpus_dir, tokenizer):
    """model.convert.calib_data is outside the fingerprint (639f522): --resume with a recipe naming other calibration
    text silently continued on the run's conversion calibrated on the first. Refused where the text read now is not
    the conversion's (its calib_sha256); the same text under another name resumes."""
    from conftest import save_checkpoint, tiny_model
    from uptrain_fixtures import killed_at_step

    stock = save_checkpoint(tiny_model("llama"), tokenizer, tmp_path / "stock")
    copy = shutil.copy(corpus_dir / "calib.txt", tmp_path / "same.txt")
    convert = {"factor": 2, "init": "calibrated", "calib_data": [str(corpus_dir / "calib.txt")], "seq_len": 32}
    model = {"source": str(stock), "convert": convert}
    recipe = tiny_recipe(corpus_dir, tmp_path / "run", model=model)
    killed_at_step(2, write_recipe(tmp_path / "r.yaml", recipe))
    other = model | {"convert": convert | {"calib_data": [str(corpus_dir / "train.txt")]}}
    write_recipe(tmp_path / "r.yaml", recipe | {"model": other})
    with pytest.raises(ClakitError, match=r"--resume: .* calibrated on other text than model\.convert\.calib_data"):
        uptrain(tmp_path / "r.yaml", resume=True, quiet=True)
    same = model | {"convert": convert | {"calib_data": [str(copy)]}}
    write_recipe(tmp_path / "r.yaml", recipe | {"model": same})
    assert (uptrain(tmp_path / "r.yaml", resume=True, quiet=True) / "config.json").is_file()


def test_a_large_file_is_hashed_once_per_version(tmp_path, monkeypatch):
    """A GGUF source is hashed for provenance by convert and again by eval of the original in one process (the
    demo): tens of GB at 70B. Remembered per version of the file (inode, size, mtime) over 64 MiB; an edit that
    changes the file is hashed again, and the digest is the file's."""
    import hashlib

    from clakit import provenance

    reads = []
    real = provenance._read_sha256
    monkeypatch.setattr(provenance, "_read_sha256", lambda path: reads.append(path) or real(path))
    provenance._remembered_sha256.cache_clear()
    path = tmp_path / "big.gguf"
    path.write_bytes(b"\0" * (provenance.CACHED_HASH_BYTES + 1))
    first = provenance.file_sha256(path)
    assert provenance.file_sha256(path) == first and len(reads) == 1
    with open(path, "r+b") as f:  # same size, same inode, a new modification time
        f.write(b"\1")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    assert provenance.file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest() != first
    assert len(reads) == 2
    stat = path.stat()
    with open(path, "r+b") as f:  # rewritten in place, its modification time set back (cp -p, rsync --inplace)
        f.write(b"\2")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert provenance.file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest() and len(reads) == 3
    small = tmp_path / "config.json"
    for content in (b"{}", b"[]"):  # small files are read each time (two writes can share a modification time)
        small.write_bytes(content)
        assert provenance.file_sha256(small) == hashlib.sha256(content).hexdigest()
