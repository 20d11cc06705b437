"""Inputs a reviewer tried in order to break `clakit uptrain`: each test here failed before its fix."""

import json
import shutil

import pytest
import yaml
from conftest import VOCAB, make_text, save_checkpoint, tiny_model
from transformers import PreTrainedTokenizerFast
from uptrain_fixtures import killed_at_step, tiny_cla_checkpoint, tiny_recipe, write_recipe  # noqa: F401

from clakit.errors import ClakitError
from clakit.uptrain import load_recipe, uptrain
from clakit.uptrain import trainer as trainer_module

MINIMAL = {
    "model": {"path": "some/cla"},
    "data": {"train": ["train.txt"]},
    "train": {"output_dir": "runs/x", "learning_rate": "3e-4"},
}


# --- recipe YAML --------------------------------------------------------------------------------------------------


def test_yaml_merge_keys_work_and_a_key_twice_beside_them_is_still_refused(tmp_path):
    """`<<: *base` is plain YAML (safe_load reads it); the duplicate-key loader refused it as 'not valid YAML'."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(MINIMAL) + "lora:\n  <<: {r: 4, lora_alpha: 8}\n  r: 8\n")
    r = load_recipe(recipe)
    assert (r.lora.r, r.lora.lora_alpha) == (8, 8)  # the key written beside the merge wins, as in safe_load
    recipe.write_text(yaml.safe_dump(MINIMAL) + "lora:\n  <<: {r: 4}\n  r: 8\n  r: 16\n")
    with pytest.raises(ClakitError, match="key 'r' is given twice"):
        load_recipe(recipe)


@pytest.mark.parametrize(
    "override, fix",
    [
        ("model.revision=0123", "got 83 (YAML read the unquoted value as int); quote it, e.g. model.revision='VALUE'"),
        ("data.train=[2024]", "data.train[0] must be a string, got 2024 (YAML read the unquoted value as int)"),
        ("model.revision=yes", "got True (YAML read the unquoted value as bool); quote it"),
        (
            "train.max_tokens=1e8",
            "must be an integer, got '1e8'; write it as a whole number: train.max_tokens=100000000",
        ),
    ],
)
def test_a_value_yaml_read_otherwise_names_how_to_write_it(tmp_path, override, fix):
    """The line named the value YAML made of the input (83 for 0123) but not how to write what was meant."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(MINIMAL))
    with pytest.raises(ClakitError) as e:
        load_recipe(recipe, [override])
    assert fix in str(e.value) and "\n" not in str(e.value)


# --- data -----------------------------------------------------------------------------------------------------------


def test_held_out_text_that_is_a_copy_of_training_text_is_refused_before_any_work(
    tiny_cla_checkpoint,  # noqa: F811
    corpus_dir,
    tmp_path,
):
    """The path rule saw two names; the run trained on its own held-out text and reported memorisation."""
    copy = tmp_path / "heldout_copy.txt"
    shutil.copy(corpus_dir / "heldout.txt", copy)
    out = tmp_path / "run"
    recipe = tiny_recipe(corpus_dir, out, model={"path": str(tiny_cla_checkpoint)}, data={"train": [str(copy)]})
    with pytest.raises(ClakitError, match=r"data.eval .*heldout.txt holds the same text as data.train .*heldout_copy"):
        uptrain(write_recipe(tmp_path / "r.yaml", recipe), quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heldout_copy.txt", "r.yaml"]  # nothing half-written


def test_held_out_text_that_is_a_copy_of_calibration_text_is_refused_before_any_work(
    tiny_llama_checkpoint, corpus_dir, tmp_path
):
    """The conversion is fitted on its calibration text: a copy of it as data.eval is not held out either."""
    copy = tmp_path / "calib_copy.txt"
    shutil.copy(corpus_dir / "heldout.txt", copy)
    out = tmp_path / "run"
    convert = {"factor": 2, "init": "calibrated", "calib_data": [str(copy)]}
    recipe = tiny_recipe(corpus_dir, out, model={"source": str(tiny_llama_checkpoint), "convert": convert})
    with pytest.raises(ClakitError, match=r"data.eval .*heldout.txt holds the same text as calibration text .*copy"):
        uptrain(write_recipe(tmp_path / "r.yaml", recipe), quiet=True)
    assert not out.exists()


@pytest.mark.parametrize("twice", ["link in a folder", "copy"])
def test_a_text_given_twice_whose_tail_is_held_out_is_refused_before_any_work(
    tiny_cla_checkpoint,  # noqa: F811
    corpus_dir,
    tmp_path,
    twice,
):
    """data.eval_fraction holds out the tail of the last train file; the same text again under another name (a link
    inside a folder, a copy with another trailing newline) trained on that tail: exit 0, held-out numbers of text the
    model was trained on."""
    folder = tmp_path / "more"
    folder.mkdir()
    if twice == "copy":
        (folder / "copy.txt").write_text((corpus_dir / "train.txt").read_text() + "\n")
    else:
        (folder / "link.txt").symlink_to(corpus_dir / "train.txt")
    out = tmp_path / "run"
    data = {"train": [str(folder), str(corpus_dir / "train.txt")], "eval": None, "eval_fraction": 0.1}
    recipe = tiny_recipe(corpus_dir, out, model={"path": str(tiny_cla_checkpoint)}, data=data)
    with pytest.raises(ClakitError, match=r"data.train holds the text of .*train.txt twice \(also as .*more/"):
        uptrain(write_recipe(tmp_path / "r.yaml", recipe), quiet=True)
    assert not out.exists()


@pytest.mark.parametrize("case", ["data.eval half of train", "tail in another train file"])
def test_held_out_text_that_is_mostly_training_text_is_refused_before_any_work(
    tiny_cla_checkpoint,  # noqa: F811
    corpus_dir,
    tmp_path,
    case,
):
    """Near-copies passed the exact comparison: data.eval holding the second half of a train file, or a train file
    holding the lines of another's held-out tail (data.eval_fraction) beside its own text. Refused by lines."""
    text = (corpus_dir / "train.txt").read_text()
    out, mine = tmp_path / "run", tmp_path / "mine.txt"
    if case == "data.eval half of train":
        mine.write_text(text[len(text) // 2 :])
        data = {"eval": str(mine)}
        match = r"data.eval is mostly text the model is fitted on \([\d,]+ of its [\d,]+ lines "
        match += r".* are in data.train, most of them from .*train.txt into .*mine.txt\)"
    else:
        mine.write_text(make_text(2000, 41) + "\n" + text[-len(text) // 5 :])
        data = {"train": [str(mine), str(corpus_dir / "train.txt")], "eval": None, "eval_fraction": 0.1}
        match = r"the held-out tail is mostly text the model is fitted on \(.* are in data.train, most of them "
        match += r"from .*mine.txt into .*train.txt"
    recipe = tiny_recipe(corpus_dir, out, model={"path": str(tiny_cla_checkpoint)}, data=data)
    with pytest.raises(ClakitError, match=match):
        uptrain(write_recipe(tmp_path / "r.yaml", recipe), quiet=True)
    assert not out.exists()


@pytest.mark.parametrize("key", ["target_modules", "full_train"])
def test_a_consumers_kv_pattern_is_refused_before_a_layout_is_chosen_on_data(
    tiny_llama_checkpoint, corpus_dir, tmp_path, monkeypatch, key
):
    """Consumers hold no k_proj/v_proj in any layout: with model.convert choosing the layout on data, the pattern
    passed --dry-run and the run refused it after the whole conversion (minutes to hours at size)."""
    import clakit.convert

    convert = {"layout": "auto", "calib_data": [str(corpus_dir / "calib.txt")], "calib_tokens": 256, "init": "mean"}
    model = {"source": str(tiny_llama_checkpoint), "convert": convert}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus_dir, tmp_path / "run", model=model,
                                                           lora={key: ["consumers.k_proj"]}))  # fmt: skip
    match = f"lora.{key} pattern 'consumers.k_proj' matches no linear module \\(only producers hold k_proj/v_proj"
    with pytest.raises(ClakitError, match=match):  # before: exit 0
        uptrain(recipe, dry_run=True, quiet=True)
    monkeypatch.setattr(clakit.convert, "convert", lambda *a, **k: pytest.fail("the conversion ran first"))
    with pytest.raises(ClakitError, match=match):
        uptrain(recipe, quiet=True)


@pytest.mark.parametrize("case", ["no teacher", "teacher of 5 layers", "baseline of 5 layers"])
def test_dry_run_checks_a_local_teacher_as_the_run_does(
    tiny_cla_checkpoint,  # noqa: F811
    tokenizer,
    corpus_dir,
    tmp_path,
    case,
):
    """--dry-run never looked at the teacher or the original baseline: a distillation without a known original, or
    an original of another shape, passed it and was refused by the run (before any work, but after the dry run
    said yes)."""
    other = save_checkpoint(tiny_model("llama", num_hidden_layers=5), tokenizer, tmp_path / "five")
    model = {"path": str(tiny_cla_checkpoint)} | ({} if case == "no teacher" else {"original": str(other)})
    distill = {"weight": 0.0 if case == "baseline of 5 layers" else 1.0}
    recipe = tiny_recipe(corpus_dir, tmp_path / "run", model=model, distill=distill)
    match = {
        "no teacher": "distillation needs the original model as teacher",
        "teacher of 5 layers": "the teacher .*five has num_hidden_layers 5 but the student 4",
        "baseline of 5 layers": "the original model .*five has num_hidden_layers 5 but the student",
    }[case]
    for dry in (True, False):
        with pytest.raises(ClakitError, match=match):
            uptrain(write_recipe(tmp_path / "r.yaml", recipe), dry_run=dry, quiet=True)
    assert not (tmp_path / "run").exists()


# --- the original model (teacher and baseline) -------------------------------------------------------------------


def other_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer of the tiny models' size (VOCAB) trained on other text: the same vocab_size, other token ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet)
    tok.train_from_iterator(["zyx wvq qvw xyz " * 500], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


@pytest.mark.parametrize("weight", [0.5, 0.0])  # the teacher; without distillation the "original" baseline
def test_an_original_with_another_tokenizer_of_the_same_size_is_refused_before_any_work(
    tiny_cla_checkpoint,  # noqa: F811
    corpus_dir,
    tmp_path,
    weight,
):
    """vocab_size alone matched, so its logits were read by the student's token ids: noise taught, no error."""
    original = save_checkpoint(tiny_model("llama"), other_tokenizer(), tmp_path / "original")
    out = tmp_path / "run"
    model = {"path": str(tiny_cla_checkpoint), "original": str(original)}
    recipe = tiny_recipe(corpus_dir, out, model=model, distill={"weight": weight})
    with pytest.raises(ClakitError, match=r"original model .*original has another tokenizer than the student"):
        uptrain(write_recipe(tmp_path / "r.yaml", recipe), quiet=True)
    assert not out.exists()


# --- provenance ---------------------------------------------------------------------------------------------------


def test_the_result_records_the_start_checkpoint_its_conversion_and_the_resolved_original(
    tiny_llama_checkpoint, corpus_dir, tmp_path
):
    """uptrain.json held the recipe as typed only: not which original (path / Hub commit) taught and scored the
    model, nor the conversion record of the checkpoint it started from; the card dropped the converter's card."""
    out = tmp_path / "run"
    model = {"source": str(tiny_llama_checkpoint), "convert": {"factor": 2, "init": "mean"}}
    recipe = tiny_recipe(corpus_dir, out, model=model, train={"max_steps": 2, "save_steps": 0}, distill={"weight": 1})
    result = uptrain(write_recipe(tmp_path / "r.yaml", recipe), quiet=True)
    record = json.loads((result / "uptrain.json").read_text())
    assert record["original"] == json.loads((out / "run.json").read_text())["original"]
    assert record["original"]["path"] == str(tiny_llama_checkpoint)
    assert record["start_checkpoint"] == str(out / "converted")
    assert record["conversion"] == json.loads((out / "converted" / "clakit_convert.json").read_text())
    card = (result / "README.md").read_text()
    assert f"original model (teacher / baseline) `{tiny_llama_checkpoint}`" in card
    assert "## Conversion" in card and "# Cross-Layer Attention version of" in card and card.count("\n---\n") == 1
    assert "clakit_convert.json" not in card  # not beside the result: its record is uptrain.json's "conversion"
    assert card.count("## Serve with vLLM") == 1  # the converter's, for the same layout, is not repeated


def test_a_checkpoint_and_the_run_record_what_wrote_them(tiny_cla_checkpoint, corpus_dir, tmp_path):  # noqa: F811
    """state.json and run.json held the step / recipe and its fingerprint only: no versions, command or time."""
    out = tmp_path / "run"
    recipe = tiny_recipe(corpus_dir, out, model={"path": str(tiny_cla_checkpoint)}, train={"max_steps": 3})
    uptrain(write_recipe(tmp_path / "r.yaml", recipe), quiet=True)
    state = json.loads((out / "checkpoints" / "step-000002" / "state.json").read_text())
    assert {"clakit", "transformers", "torch", "command", "created"} <= set(state["provenance"])
    run = json.loads((out / "run.json").read_text())  # the run's own record too
    assert {"clakit", "transformers", "torch", "command", "created"} <= set(run["provenance"])


# --- what trains --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tied_cla_checkpoint(tokenizer, tmp_path_factory):
    """The tiny CLA2 model with lm_head tied to the input embeddings (as SmolLM2's)."""
    from clakit.convert.inmemory import cla_model_from
    from clakit.convert.layout import uniform_layout

    model = cla_model_from(tiny_model("llama", tie_word_embeddings=True), uniform_layout(4, 2), "mean")
    return save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("tied_cla"))


def test_lora_on_a_tied_lm_head_is_refused_before_any_work(tied_cla_checkpoint, corpus_dir, tmp_path):
    """The merge added LoRA's delta to the shared tensor: the saved embeddings changed too (not the trained model)."""
    out = tmp_path / "run"
    lora = {"target_modules": ["q_proj", "lm_head"]}
    recipe = tiny_recipe(corpus_dir, out, model={"path": str(tied_cla_checkpoint)}, lora=lora)
    with pytest.raises(ClakitError, match=r"matches lm_head, which this model ties .*lora.full_train=\[lm_head\]"):
        uptrain(write_recipe(tmp_path / "r.yaml", recipe), quiet=True)
    assert not out.exists()


def test_a_tied_lm_head_trained_in_full_is_allowed(tied_cla_checkpoint):
    from clakit.sources import load_config, resolve_source
    from clakit.uptrain.recipe import LoraSection
    from clakit.uptrain.student import check_patterns

    config = load_config(resolve_source(str(tied_cla_checkpoint)))
    check_patterns(config, LoraSection(target_modules=["q_proj", "lm_head"], full_train=["lm_head"]))
    check_patterns(config, LoraSection(r=0, target_modules=["lm_head"], full_train=["q_proj"]))


# --- resume -------------------------------------------------------------------------------------------------------


def test_resume_from_another_folder_trains_the_checkpoint_the_run_started_from(
    tiny_cla_checkpoint,  # noqa: F811
    tokenizer,
    corpus_dir,
    tmp_path,
    monkeypatch,
):
    """A relative model.path resumed from another working directory named another CLA checkpoint of the same
    shapes: the saved LoRA went on training over, and was merged into, weights it was never trained on."""
    from safetensors.torch import load_file

    from clakit.convert.inmemory import cla_model_from
    from clakit.convert.layout import uniform_layout

    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(tiny_cla_checkpoint, first / "cla")
    other = cla_model_from(tiny_model("llama", seed=1), uniform_layout(4, 2), "mean")
    save_checkpoint(other, tokenizer, second / "cla")
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus_dir, out, model={"path": "cla"}))
    monkeypatch.chdir(first)
    killed_at_step(3, recipe)
    monkeypatch.chdir(second)
    result = uptrain(recipe, resume=True, quiet=True)
    frozen = "model.layers.0.mlp.up_proj.weight"  # no LoRA, not trained: the start checkpoint's own
    start = {k: v for f in (first / "cla").glob("*.safetensors") for k, v in load_file(f).items()}
    assert load_file(result / "model.safetensors")[frozen].equal(start[frozen])
    assert json.loads((result / "uptrain.json").read_text())["start_checkpoint"] == str(first / "cla")


def test_resume_refuses_when_the_checkpoint_the_run_started_from_is_gone(
    tiny_cla_checkpoint,  # noqa: F811
    corpus_dir,
    tmp_path,
):
    shutil.copytree(tiny_cla_checkpoint, tmp_path / "cla")
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus_dir, out, model={"path": str(tmp_path / "cla")}))
    killed_at_step(3, recipe)
    shutil.rmtree(tmp_path / "cla")
    with pytest.raises(ClakitError, match=r"--resume: the run in .* started from .*cla, which is gone; put the"):
        uptrain(recipe, resume=True, quiet=True)


def test_a_resumed_run_logs_each_step_once(tiny_cla_checkpoint, corpus_dir, tmp_path):  # noqa: F811
    """Killed at step 3 (checkpoint 2): metrics.jsonl held step 3 of the lost run and step 3 of the resumed one."""
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus_dir, out, model={"path": str(tiny_cla_checkpoint)}))
    killed_at_step(3, recipe)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "tok')  # a line torn by the kill
    uptrain(recipe, resume=True, quiet=True)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_run_killed_before_its_first_checkpoint_logs_each_step_once(
    tiny_cla_checkpoint,  # noqa: F811
    corpus_dir,
    tmp_path,
    monkeypatch,
):
    """kill -9 at step 3 (no checkpoint; nothing cleans up): --resume starts over and logged steps 1-3 twice."""
    from clakit.uptrain import pipeline

    out = tmp_path / "run"
    recipe = tiny_recipe(corpus_dir, out, model={"path": str(tiny_cla_checkpoint)}, train={"save_steps": 0})
    recipe = write_recipe(tmp_path / "r.yaml", recipe)
    with monkeypatch.context() as m:
        m.setattr(pipeline, "_abandon", lambda *args: None)  # a kill -9 runs no cleanup
        killed_at_step(3, recipe)
    uptrain(recipe, resume=True, quiet=True)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


# --- the run folder -----------------------------------------------------------------------------------------------


def test_a_run_inside_another_clakit_output_is_refused_before_any_work(
    tiny_cla_checkpoint,  # noqa: F811
    corpus_dir,
    tmp_path,
):
    """train.output_dir inside a finished run (or its model/) was accepted: the nested run polluted the model folder
    and blocked the outer run's --overwrite ('holds files clakit did not write')."""
    first = tmp_path / "first"
    recipe = tiny_recipe(corpus_dir, first, model={"path": str(tiny_cla_checkpoint)}, train={"max_steps": 2})
    uptrain(write_recipe(tmp_path / "r.yaml", recipe), quiet=True)
    for nested, noun in ((first / "model" / "run", "uptrained model"), (first / "deeper" / "run", "uptrain run")):
        recipe["train"]["output_dir"] = str(nested)
        with pytest.raises(ClakitError, match=f"is inside .*, a clakit {noun}; clakit does not write into another"):
            uptrain(write_recipe(tmp_path / "r.yaml", recipe), quiet=True)
        assert not nested.exists() and not (first / "deeper").exists()


def test_a_resumed_run_whose_converted_report_is_missing_still_saves_and_reports(
    tiny_cla_checkpoint,  # noqa: F811
    corpus_dir,
    tmp_path,
):
    """The last line read eval/converted.json's numbers unconditionally: without it (a resumed FSDP run killed before
    it scored the converted model; the file removed) the run failed with a KeyError after all its training."""
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus_dir, out, model={"path": str(tiny_cla_checkpoint)}))
    killed_at_step(3, recipe)
    (out / "eval" / "converted.json").unlink()
    result = uptrain(recipe, resume=True, quiet=True)
    assert (result / "model.safetensors").is_file() and "| converted (before) | n/a |" in (
        result / "README.md"
    ).read_text()


def test_a_start_report_damaged_during_the_run_does_not_discard_the_trained_model(
    tiny_cla_checkpoint,  # noqa: F811
    corpus_dir,
    tmp_path,
):
    """eval/original.json was read while model/ was staged: a damaged one discarded the trained model, and each
    --resume trained the last steps again only to fail the same way. Now the model is saved, the card says n/a and
    the error names the report (the run has finished)."""
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus_dir, out, model={"path": str(tiny_cla_checkpoint)}))
    killed_at_step(3, recipe)
    (out / "eval" / "converted.json").write_text("{")
    with pytest.raises(ClakitError, match=r"the model is saved in .*model, but its report could not be written"):
        uptrain(recipe, resume=True, quiet=True)
    assert "| converted (before) | n/a |" in (out / "model" / "README.md").read_text()


@pytest.mark.parametrize("weight, role", [(0.5, "the teacher"), (0.0, "the original model")])
def test_an_original_with_other_layers_is_refused_without_hidden_mse_too(
    tokenizer,
    tiny_cla_checkpoint,  # noqa: F811
    corpus_dir,
    tmp_path,
    weight,
    role,
):
    """Layers and width were compared only with hidden_mse_weight: a 6-layer 'original' of the 4-layer student
    taught it and stood in the card as 'original (full KV)', though no conversion changes the layer count."""
    original = save_checkpoint(tiny_model("llama", num_hidden_layers=6), tokenizer, tmp_path / "original")
    out = tmp_path / "run"
    model = {"path": str(tiny_cla_checkpoint), "original": str(original)}
    recipe = tiny_recipe(corpus_dir, out, model=model, distill={"weight": weight})
    with pytest.raises(ClakitError, match=f"{role} .*original has num_hidden_layers 6 but the student 4"):
        uptrain(write_recipe(tmp_path / "r.yaml", recipe), quiet=True)
    assert not out.exists()


def test_held_out_loss_on_one_process_scores_each_block_once():
    """Padded to full batches for FSDP's sake, one process scored block 0 again up to per_device_eval_batch_size
    times: 3 held-out blocks at batch 64 cost 64 forwards of a block instead of 3."""
    import torch

    from clakit.uptrain.trainer import heldout_loss

    model = tiny_model("llama")
    rows = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(len(kwargs["input_ids"])), with_kwargs=True
    )
    blocks = torch.randint(0, VOCAB, (3, 16))
    result = heldout_loss(model, blocks, batch_size=64)
    assert rows == [3] and result["tokens"] == 3 * 15
    with torch.no_grad():
        logits = model(input_ids=blocks).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), blocks[:, 1:].flatten())
    assert abs(result["loss"] - expected.item()) < 1e-5


def test_a_conversion_inside_uptrain_names_the_recipe_settings_of_its_calibration_text(
    tokenizer, corpus_dir, tmp_path
):
    """model.source + model.convert with too little calibration text: the fix named only convert's --calib-data,
    a flag an uptrain user never typed."""
    stock = save_checkpoint(tiny_model("llama"), tokenizer, tmp_path / "stock")
    (tmp_path / "short.txt").write_text("a few words")
    convert = {"factor": 2, "init": "calibrated", "calib_data": [str(tmp_path / "short.txt")], "seq_len": 32}
    recipe = tiny_recipe(corpus_dir, tmp_path / "run", model={"source": str(stock), "convert": convert})
    with pytest.raises(ClakitError, match=r"calibration text is too short.*model\.convert\.calib_data") as e:
        uptrain(write_recipe(tmp_path / "r.yaml", recipe), quiet=True)
    assert str(e.value).count("model.convert.calib_data") == 1, e.value  # it was named twice, two ways


def test_a_failed_run_leaves_no_folders_it_created_above_its_output(
    tiny_cla_checkpoint,  # noqa: F811
    corpus_dir,
    tmp_path,
    monkeypatch,
):
    """train.output_dir runs/a/b/run: the staging folder beside it creates runs/a/b; a run that fails before its
    first checkpoint is removed, and so are the folders it made (convert does the same)."""
    out = tmp_path / "runs" / "a" / "b" / "run"
    recipe = tiny_recipe(corpus_dir, out, model={"path": str(tiny_cla_checkpoint)}, train={"save_steps": 0})

    def crash(self):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(trainer_module.Trainer, "run", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        uptrain(write_recipe(tmp_path / "r.yaml", recipe), quiet=True)
    assert not (tmp_path / "runs").exists()
    (tmp_path / "runs").mkdir()  # a folder that was there before the run stays
    with pytest.raises(RuntimeError, match="simulated"):
        uptrain(write_recipe(tmp_path / "r.yaml", recipe), quiet=True)
    assert (tmp_path / "runs").is_dir() and not (tmp_path / "runs" / "a").exists()


@pytest.mark.parametrize(
    "train", [{"gradient_accumulation_steps": 10**12}, {"per_device_train_batch_size": 10**9}], ids=["ga", "batch"]
)
def test_a_step_that_reads_more_blocks_than_the_data_holds_is_refused_before_any_work(
    tiny_cla_checkpoint,  # noqa: F811
    corpus_dir,
    tmp_path,
    train,
):
    """gradient_accumulation_steps=1e12 was accepted and the first step ran practically forever (1e12 micro-batches
    over a few dozen blocks); a batch larger than the data read every block many times in one step."""
    out = tmp_path / "run"
    recipe = tiny_recipe(corpus_dir, out, model={"path": str(tiny_cla_checkpoint)}, train=train)
    with pytest.raises(ClakitError, match=r"one optimizer step reads .* blocks of data.seq_len=32, but data.train"):
        uptrain(write_recipe(tmp_path / "r.yaml", recipe), quiet=True)
    assert not out.exists()


@pytest.mark.parametrize(
    "kind, overrides, message",
    [
        ("mistral", {}, "has attention window 16 but the student None"),  # same sizes, another attention (its window)
        ("mistral", {"sliding_window": None}, None),  # a Mistral without a window is a Llama: its GGUF reads `llama`
        ("llama", {"head_dim": 16}, "has head_dim 16 but the student 12"),
    ],
)
def test_an_original_of_another_family_or_head_width_is_refused(
    tokenizer,
    tiny_cla_checkpoint,  # noqa: F811
    corpus_dir,
    tmp_path,
    kind,
    overrides,
    message,
):
    """Only vocab, layers and width were compared: a Mistral of the Llama student's sizes (sliding window 16) taught
    it and stood in the card as its 'original', silently (no conversion changes the family or the heads)."""
    original = save_checkpoint(tiny_model(kind, **overrides), tokenizer, tmp_path / "original")
    out = tmp_path / "run"
    model = {"path": str(tiny_cla_checkpoint), "original": str(original)}
    recipe = tiny_recipe(corpus_dir, out, model=model, distill={"weight": 0.5})
    if message is None:  # accepted: the run trains
        assert uptrain(write_recipe(tmp_path / "r.yaml", recipe), quiet=True).is_dir()
        return
    with pytest.raises(ClakitError, match=f"the teacher .*original {message}"):
        uptrain(write_recipe(tmp_path / "r.yaml", recipe), quiet=True)
    assert not out.exists()
