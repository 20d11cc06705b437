"""Edge cases of `clakit uptrain`: unused recipe values, the fix a refusal names for a finished run, a warmup as long
as the run, a user's file in the report folder at the end of a run, and one rule for "the same text"."""

import json
from pathlib import Path

import pytest
from test_uptrain_run import assert_refused, run_cli
from uptrain_fixtures import tiny_cla_checkpoint, tiny_recipe, write_recipe  # noqa: F401

from clakit.errors import ClakitError
from clakit.uptrain import trainer as trainer_module
from clakit.uptrain.recipe import load_recipe

WIKI = "wikitext:wikitext-2-raw-v1:train"  # a datasets spec: never fetched by the recipe checks


def recipe_file(tmp_path: Path, corpus_dir: Path, **sections) -> Path:
    recipe = tiny_recipe(corpus_dir, tmp_path / "run", model={"path": str(tmp_path)}, **sections)
    return write_recipe(tmp_path / "r.yaml", recipe)


# --- 1. data.eval_fraction does nothing when data.eval is given: not range-checked then ---------------------------


def test_eval_fraction_is_not_checked_when_data_eval_is_given(tmp_path, corpus_dir):
    path = recipe_file(tmp_path, corpus_dir, data={"eval_fraction": 1.5})
    assert load_recipe(path).data.eval_fraction == 1.5  # unused, like copy_span without copies
    with pytest.raises(ClakitError, match="data.eval_fraction must be between 0 and 1, got 1.5"):
        load_recipe(path, ["data.eval=null"])  # held out from the train text: now it counts


# --- 2. an existing run folder: the fix depends on whether its run has finished ------------------------------------


def test_existing_run_folder_names_the_fix_for_a_finished_and_an_unfinished_run(
    capsys,
    tmp_path,
    corpus_dir,
    tiny_cla_checkpoint,  # noqa: F811
):
    out = tmp_path / "run"
    recipe = tiny_recipe(corpus_dir, out, model={"path": str(tiny_cla_checkpoint)}, train={"max_steps": 2})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert run_cli(capsys, path)[0] == 0
    before = {p.name for p in out.rglob("*")}
    assert_refused(capsys, out, [path], f"its run has finished (its model is {out / 'model'})", before)
    assert "continue it with --resume" not in run_cli(capsys, path)[1]
    changed = [path, "train.learning_rate=1e-2", "--resume"]  # a finished run is not continued with a new recipe
    assert_refused(capsys, out, changed, "has finished (its model is", before)
    assert_refused(capsys, out, changed, "choose another train.output_dir for the new recipe", before)
    (out / "model" / "config.json").unlink()  # as if killed before the result was saved: it can be continued
    before.discard("config.json")
    assert_refused(capsys, out, [path], "already exists; continue it with --resume or replace it", before)


# --- 3. a warmup at least as long as the run: the learning rate would never reach its peak -------------------------


def test_warmup_as_long_as_max_steps_is_refused_naming_both(tmp_path, corpus_dir):
    path = recipe_file(tmp_path, corpus_dir)
    with pytest.raises(ClakitError, match=r"train.warmup_steps=4 is not shorter than train.max_steps=4") as e:
        load_recipe(path, ["train.max_steps=4", "train.warmup_steps=4"])
    assert "\n" not in str(e.value)
    assert load_recipe(path, ["train.max_steps=4", "train.warmup_steps=3"]).train.warmup_steps == 3
    # 1 step with a warmup learns nothing at all: refused by the recipe when max_steps says 1 (so --dry-run refuses
    # it too), by trainer.check_plan when the steps come from max_tokens or epochs
    with pytest.raises(ClakitError, match="the run has 1 step and a warmup"):
        load_recipe(path, ["train.max_steps=1", "train.warmup_steps=1"])
    # constant has no warmup at all: its own refusal comes first
    with pytest.raises(ClakitError, match="train.lr_scheduler_type constant has no warmup"):
        load_recipe(path, ["train.max_steps=2", "train.warmup_steps=5", "train.lr_scheduler_type=constant"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        # 64 tokens a step (batch 2 x seq_len 32): 3 steps
        (
            ["train.max_steps=-1", "train.max_tokens=192", "train.warmup_steps=3"],
            "the warmup (train.warmup_steps=3) is not shorter than the run (3 steps from train.max_tokens=192)",
        ),
        (
            ["train.max_steps=4", "train.warmup_steps=0", "train.warmup_ratio=0.8"],
            # refused when the recipe is read (--dry-run too), the run's own steps known without the data
            "the warmup (4 steps from train.warmup_ratio=0.8) is not shorter than the run (train.max_steps=4)",
        ),
    ],
    ids=["steps-from-max-tokens", "warmup-from-ratio"],
)
def test_warmup_as_long_as_the_planned_run_is_refused_before_any_work(
    capsys,
    tmp_path,
    corpus_dir,
    tiny_cla_checkpoint,  # noqa: F811
    overrides,
    message,
):
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus_dir, out, model={"path": str(tiny_cla_checkpoint)}))
    assert_refused(capsys, out, [path, *overrides], message)


# --- 4. a file of the user's in OUTPUT_DIR/report/ while the run trains: the trained model is kept ----------------


def test_a_user_file_in_the_report_folder_does_not_lose_the_trained_model(
    capsys,
    tmp_path,
    corpus_dir,
    tiny_cla_checkpoint,  # noqa: F811
    monkeypatch,
):
    out = tmp_path / "run"
    recipe = tiny_recipe(corpus_dir, out, model={"path": str(tiny_cla_checkpoint)}, train={"max_steps": 2})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    train = trainer_module.Trainer.run

    def run_and_meddle(self):  # the user saves notes into the report folder while the run trains
        train(self)
        (out / "report").mkdir(exist_ok=True)
        (out / "report" / "notes.txt").write_text("mine")

    monkeypatch.setattr(trainer_module.Trainer, "run", run_and_meddle)
    code, err = run_cli(capsys, path)
    assert (out / "model" / "config.json").is_file() and (out / "model" / "model.safetensors").is_file()
    assert (out / "report" / "notes.txt").read_text() == "mine"  # never deleted or overwritten
    assert code == 2 and err.startswith("clakit: error: ") and "\n" not in err and "Traceback" not in err
    assert f"the model is saved in {out / 'model'}, but its report could not be written (" in err, err
    assert f"{out / 'report'} already exists and is not a clakit report folder" in err and "clakit report" in err
    # the command names the reports in the page's order (a shell's `eval/*.json` put converted.json first, the
    # baseline every row is compared with)
    reports = [out / "eval" / f"{n}.json" for n in ("original", "converted", "uptrained")]
    command = " ".join(str(r) for r in reports if r.is_file())
    assert f"`clakit report {command} -o FOLDER`" in err, err
    assert json.loads((out / "eval" / "uptrained.json").read_text())["perplexity"] > 0
    assert "continue it with --resume" not in err  # the run has finished: kept as it is, nothing to resume
    assert run_cli(capsys, path, "--resume") == (0, "")  # returns the finished run's result


# --- 5. one rule for "the same text": train twice, held-out vs train, held-out vs calibration ----------------------


def refusal(tmp_path, corpus_dir, *overrides) -> str | None:
    try:
        load_recipe(recipe_file(tmp_path, corpus_dir), list(overrides))
    except ClakitError as e:
        return str(e)
    return None


def test_a_datasets_spec_in_train_and_eval_is_refused(tmp_path, corpus_dir):
    """The old held-out check compared only local paths that exist: the same datasets split passed as both."""
    message = refusal(tmp_path, corpus_dir, f"data.train=[{WIKI}]", f"data.eval=[{WIKI}]")
    assert message and f"data.eval {WIKI} is (or holds) training text {WIKI}" in message


def test_the_refusals_of_the_old_checks_stay(tmp_path, corpus_dir):
    missing = corpus_dir / "new.txt"  # not there yet, but inside the train folder: read by it once written
    assert "is (or holds) training text" in refusal(
        tmp_path, corpus_dir, f"data.train=[{corpus_dir}]", f"data.eval=[{missing}]"
    )
    assert "is (or holds) training text" in refusal(tmp_path, corpus_dir, f"data.eval=[{corpus_dir}]")
    assert "names the same text twice" in refusal(
        tmp_path, corpus_dir, f"data.train=[{corpus_dir}, {corpus_dir / 'train.txt'}]", "data.eval=null"
    )
    assert "names the same text twice" in refusal(tmp_path, corpus_dir, f"data.train=[{WIKI}, {WIKI}]")
    calib = ["model.path=null", f"model.source={tmp_path}", f"model.convert={{calib_data: [{corpus_dir}]}}"]
    assert "is (or holds) calibration text" in refusal(tmp_path, corpus_dir, *calib)


def test_a_datasets_spec_is_not_inside_the_working_directory(tmp_path, corpus_dir, monkeypatch):
    """`data.train=[.]` (the .txt here) with a datasets split as held-out text: the spec resolved as a path inside
    the working directory, and the old held-out check refused it as training text."""
    monkeypatch.chdir(corpus_dir)
    assert refusal(tmp_path, corpus_dir, "data.train=[.]", f"data.eval=[{WIKI}]") is None


@pytest.mark.parametrize(
    "held, fix",
    [
        ("mine", "choose another train.output_dir"),
        ("uptrain", "start it over with --overwrite"),  # a run folder that lost its run.json
        (None, "drop --resume to start one there"),
    ],
    ids=["folder-of-mine", "run-without-run-json", "empty-folder"],
)
def test_resume_into_a_folder_holding_no_run_gives_advice_that_works(capsys, tmp_path, corpus_dir, held, fix):
    """--resume into a folder holding no run said "drop --resume to start one there"; dropping it was refused in
    turn where the folder holds the user's files ("already exists and is not a clakit uptrain run ... choose another
    folder") or is a run folder without its run.json ("continue it with --resume"). For an empty folder dropping
    --resume works (dry run)."""
    from clakit import outputs

    out = tmp_path / "run"
    out.mkdir()
    if held == "mine":
        (out / "notes.txt").write_text("mine")
    elif held == "uptrain":
        outputs.write_marker(out, "uptrain")
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus_dir, out, model={"path": str(tmp_path / "m")}))
    before = {p.name for p in out.rglob("*")}
    assert_refused(capsys, out, [path, "--resume"], f"--resume: {out} holds no clakit uptrain run; {fix}", before)
    if held is None:
        (tmp_path / "m").mkdir()
        code, err = run_cli(capsys, path, "--dry-run")
        assert "already exists" not in err, err


# --- a tokenizer shipped as code travels into the uptrained model (as into a conversion) -------------------------


def test_a_tokenizer_shipped_as_code_travels_into_the_uptrained_model(
    tmp_path, corpus_dir, capsys, tiny_cla_checkpoint  # noqa: F811
):
    """A start checkpoint whose tokenizer_config.json's auto_map names its own module: save_pretrained of the
    tokenizer (a generic class, loaded without trust_remote_code) wrote the auto_map but not tok_x.py, so
    AutoTokenizer(model/, trust_remote_code=True) failed."""
    import shutil

    from transformers import AutoTokenizer

    start = Path(shutil.copytree(tiny_cla_checkpoint, tmp_path / "start"))
    code = "from transformers import PreTrainedTokenizerFast\n\n\nclass XTok(PreTrainedTokenizerFast):\n    pass\n"
    (start / "tok_x.py").write_text(code)
    config = json.loads((start / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "tok_x.XTok"]}
    (start / "tokenizer_config.json").write_text(json.dumps(config))
    train = {"max_steps": 2, "save_steps": 0}
    recipe = tiny_recipe(corpus_dir, tmp_path / "run", model={"path": str(start)}, train=train)
    code, err = run_cli(capsys, write_recipe(tmp_path / "r.yaml", recipe))
    assert code == 0, err
    loaded = AutoTokenizer.from_pretrained(tmp_path / "run" / "model", trust_remote_code=True)
    assert type(loaded).__name__ == "XTok"
