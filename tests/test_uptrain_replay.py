"""Round 4 of uptrain: reproducibility, provenance and composed features. A run's records (run.json, the model's
uptrain.json and card) hold every recipe key, the device and libraries it ran on; the recipe as recorded reruns to
the same weights; resume equals a straight run with everything composed; layout-dependent LoRA patterns are checked
before the conversion; and the starts nobody trained from (fewer KV heads, interleaved layouts under FSDP) train."""

import dataclasses
import json
import re
import shutil
import typing
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
import yaml
from conftest import save_checkpoint, tiny_model
from uptrain_fixtures import killed_at_step, tiny_recipe, write_recipe

from clakit.errors import ClakitError
from clakit.uptrain import uptrain
from clakit.uptrain.recipe import Recipe, load_recipe


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def same_tensors(a: Path, b: Path) -> bool:
    x, y = tensors_of(a), tensors_of(b)
    return set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


def train_lines(run: Path) -> list[dict]:
    """metrics.jsonl less its wall-clock fields."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in x.items() if k not in ("tokens_per_s", "elapsed_s")} for x in lines]


def key_paths(cls, prefix: str = "") -> list[str]:
    """Every settings key of a dataclass, nested sections (model.convert: ConvertConfig) by their dotted names: a
    field added to any settings class is a key the records must hold."""
    paths = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)] or [tp]
        if dataclasses.is_dataclass(inner[0]):
            paths += key_paths(inner[0], f"{prefix}{f.name}.")
        else:
            paths.append(prefix + f.name)
    return paths


def lookup(d: dict, path: str):
    for part in path.split("."):
        assert isinstance(d, dict) and part in d, f"{path}: {part} missing"
        d = d[part]
    return d


def load_recipe_from(raw: dict) -> Recipe:
    """A Recipe from plain data, as load_recipe builds it from YAML (types coerced), without validating it."""
    from clakit.uptrain.recipe import _build

    return _build(Recipe, raw, "")


def card_recipe(model_dir: Path) -> dict:
    """The YAML block of the card's `## Recipe` section."""
    card = (model_dir / "README.md").read_text()
    found = re.search(r"## Recipe\n.*?```yaml\n(.*?)\n```", card, re.S)
    assert found, "the card has no recipe block"
    return yaml.safe_load(found[1])


# --- one composed run, from relative paths, with overrides -----------------------------------------------------------

OVERRIDES = ["train.max_steps=4", "lora.lora_dropout=0.2", "data.copy_fraction=0.5", "data.copy_span=8"]


@pytest.fixture(scope="module")
def composed(tiny_llama_checkpoint, corpus_dir, tmp_path_factory):
    """A run converting model.source (an interleaved layout) in bf16 with gradient checkpointing, copies, dropout
    and distillation, started from a working folder with relative paths and overrides."""
    work = tmp_path_factory.mktemp("work")
    shutil.copytree(tiny_llama_checkpoint, work / "src")
    for name in ("train.txt", "heldout.txt"):
        shutil.copy(corpus_dir / name, work / name)
    recipe = tiny_recipe(
        Path("."),
        Path("runs/a"),
        model={"source": "src", "convert": {"kv_source_layers": [0, 1, 0, 1], "init": "mean"}},
        data={"train": ["train.txt"], "eval": ["heldout.txt"]},
        train={"bf16": True, "gradient_checkpointing": True, "max_steps": 6, "warmup_steps": 0, "warmup_ratio": 0.3},
        lora={"full_train": ["k_proj", "consumers.q_proj"]},
        distill={"weight": 0.5, "hidden_mse_weight": 0.1},
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        uptrain(write_recipe(work / "r.yaml", recipe), OVERRIDES, quiet=True)
    return work


def test_every_recipe_key_is_in_run_json_uptrain_json_and_the_card(composed):
    """The card showed a few settings in prose (and model.convert as a Python dict): a reader of the model alone
    could not tell e.g. max_grad_norm, adam_beta2, eval_max_tokens or copy_span. Now it holds the recipe as run, every
    key of every settings class, the overrides applied, equal to run.json's and uptrain.json's."""
    run = composed / "runs" / "a"
    expected = load_recipe(composed / "r.yaml", OVERRIDES).to_dict()
    records = {
        "run.json": json.loads((run / "run.json").read_text())["recipe"],
        "uptrain.json": json.loads((run / "model" / "uptrain.json").read_text())["recipe"],
        "recipe.yaml": yaml.safe_load((run / "recipe.yaml").read_text()),
        "the card": card_recipe(run / "model"),
    }
    paths = key_paths(Recipe)
    assert "model.convert.kv_source_layers" in paths and "train.max_grad_norm" in paths and len(paths) > 60
    for where, recorded in records.items():
        for path in paths:
            assert lookup(recorded, path) == lookup(expected, path), f"{where}: {path}"
    assert records["the card"]["train"]["max_steps"] == 4 and records["the card"]["data"]["copy_span"] == 8


def test_the_result_records_where_and_with_what_it_trained(composed):
    """uptrain.json named neither the device nor the mixed precision the run used (the recipe's bf16 is a wish: FSDP
    keeps an fp32 student), nor peft and accelerate, which build the adapters and run the loop, nor the fingerprint
    and data digest a rerun is checked against (run.json had them, but it is not part of the saved model), nor the
    schedule resolved from the recipe (the card said "warmup 0 steps / ratio 0.3")."""
    run = composed / "runs" / "a"
    record = json.loads((run / "model" / "uptrain.json").read_text())
    started = json.loads((run / "run.json").read_text())
    assert (record["device"], record["mixed_precision"], record["distributed_type"]) == ("cpu", "bf16", "NO")
    assert record["fingerprint"] == started["fingerprint"] and record["data_sha256"] == started["data_sha256"]
    state = json.loads(next((run / "checkpoints").glob("step-*/state.json")).read_text())
    for where in (record, started["provenance"], state["provenance"]):
        assert (where["peft"], where["accelerate"]) == (version("peft"), version("accelerate"))
    card = (run / "model" / "README.md").read_text()
    assert "(cpu, mixed precision bf16)" in card
    # the schedule as run: 4 steps (an override), a warmup of ceil(0.3 x 4) = 2 steps from warmup_ratio
    assert record["plan"] == {"total_steps": 4, "tokens_per_step": 2 * 32, "warmup_steps": 2}
    assert "warmup 2 of 4 steps (warmup_ratio 0.3)" in card
    assert record["conversion"]["settings"]["kv_source_layers"] == [0, 1, 0, 1]
    assert record["cwd"] == str(composed) and record["start_checkpoint"] == str(run / "converted")


def test_the_recipe_on_the_card_reruns_to_the_same_weights(composed, monkeypatch):
    """Replay as docs/uptrain.md says: the card's recipe block saved as a file, run from the recorded working folder
    with another output_dir: the same fingerprint, loss curve and weights, bit for bit."""
    run = composed / "runs" / "a"
    record = json.loads((run / "model" / "uptrain.json").read_text())
    replay = composed / "replay.yaml"
    replay.write_text(yaml.safe_dump(card_recipe(run / "model"), sort_keys=False))
    monkeypatch.chdir(record["cwd"])
    again = uptrain(replay, ["train.output_dir=runs/b"], quiet=True)
    assert json.loads((again / "uptrain.json").read_text())["fingerprint"] == record["fingerprint"]
    assert train_lines(composed / "runs" / "b") == train_lines(run)
    assert same_tensors(run / "model", again)


def test_an_uptrained_model_uptrains_again_with_its_records_and_teacher(composed, corpus_dir, tmp_path):
    """model.path an earlier run's model/: it has uptrain.json, no clakit_convert.json. The second run found no
    teacher ("distillation needs the original model as teacher: set model.original") and, without distillation,
    recorded conversion None and original None (no baseline report) and filed the earlier card under
    "## Conversion". Now the earlier run's resolved original teaches and scores, its conversion record is carried
    on, its uptrain.json is kept as start_uptrain, and its card sits under its own heading."""
    first = composed / "runs" / "a" / "model"
    earlier = json.loads((first / "uptrain.json").read_text())
    sections = {
        "model": {"path": str(first)},
        "train": {"max_steps": 2, "save_steps": 0, "warmup_steps": 0},
        "lora": {"full_train": ["k_proj"]},
        "distill": {"weight": 0.5},
    }
    out = uptrain(write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus_dir, tmp_path / "run", **sections)), quiet=True)
    record = json.loads((out / "uptrain.json").read_text())
    assert record["original"]["path"] == earlier["original"]["path"] == str(composed / "src")
    assert record["conversion"] == earlier["conversion"] and record["conversion"]["settings"]["init"] == "mean"
    assert record["start_uptrain"]["fingerprint"] == earlier["fingerprint"]
    assert (tmp_path / "run" / "eval" / "original.json").is_file()
    card = (out / "README.md").read_text()
    assert "## Start checkpoint (uptrained before)" in card and card.index("## Recipe") < card.index("## Start")
    ours = card[: card.index("## Start")]  # the earlier run's card below ours has its own "converted (before)" row
    assert "| start (before; uptrained earlier) |" in ours and "converted (before)" not in ours  # its start's row


def test_a_killed_composed_run_resumes_to_the_straight_runs_weights(composed, monkeypatch):
    """bf16 on the CPU, gradient checkpointing, an interleaved layout converted inside the run, copies, dropout,
    the teacher's KL and hidden MSE: killed after step 3 (its last checkpoint at 2), resumed, it logs and saves what
    the uninterrupted run did."""
    monkeypatch.chdir(composed)
    recipe = load_recipe(composed / "r.yaml", OVERRIDES).to_dict()
    recipe["train"]["output_dir"] = "runs/killed"
    path = write_recipe(composed / "killed.yaml", recipe)
    killed_at_step(3, path)
    result = uptrain(path, resume=True, quiet=True)
    assert train_lines(composed / "runs" / "killed") == train_lines(composed / "runs" / "a")
    assert same_tensors(composed / "runs" / "a" / "model", result)
    # uptrain.json's command and time are the resume's; the first session's are kept beside them (run.json's)
    run = json.loads((composed / "runs" / "killed" / "run.json").read_text())
    record = json.loads((result / "uptrain.json").read_text())
    assert record["started"] == run["provenance"]
    # the thread count (CPU reductions split by it) and the start checkpoint by content, as convert's and eval's name
    assert record["torch_threads"] == run["provenance"]["torch_threads"] == torch.get_num_threads()
    assert record["start_summary"] == run["start_summary"] and len(run["start_summary"]) == 64


# --- layout-dependent patterns, before the conversion ----------------------------------------------------------------


@pytest.mark.parametrize(
    "convert,lora",
    [
        ({"factor": 2}, {"full_train": ["consumers.k_proj"]}),
        ({}, {"full_train": ["k_proj"], "target_modules": ["consumers.v_proj"]}),  # the default factor 2
        ({"kv_source_layers": [0, 1, 0, 1]}, {"full_train": ["consumers.v_proj", "q_proj"]}),
    ],
    ids=["factor", "default-factor", "interleaved"],
)
def test_a_consumer_kv_pattern_is_refused_before_the_conversion(
    tiny_llama_checkpoint, corpus_dir, tmp_path, monkeypatch, convert, lora
):
    """A consumer holds no k_proj/v_proj. With model.source the patterns naming producers./consumers. were skipped
    before the run (the layout was thought unknown) and refused only after the conversion and the converted model's
    evaluation (hours at 70B); a factor, an explicit layout or the default factor 2 fix the layout before any work."""
    from clakit.uptrain import student

    def no_conversion(*args, **kwargs):
        raise AssertionError("the conversion ran before the patterns were checked")

    monkeypatch.setattr(student, "convert_source", no_conversion)
    model = {"source": str(tiny_llama_checkpoint), "convert": {"init": "mean", **convert}}
    recipe = tiny_recipe(corpus_dir, tmp_path / "run", model=model, lora=lora)
    with pytest.raises(ClakitError, match=r"pattern 'consumers\.[kv]_proj' matches no linear module \(only producers"):
        uptrain(write_recipe(tmp_path / "r.yaml", recipe), quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_a_layout_chosen_on_data_still_checks_its_producer_patterns_after_the_conversion():
    """layout auto: the converter chooses the layout on the calibration text, so no layout is planned and the
    producers./consumers. patterns wait for the conversion (as before)."""
    from clakit.convert.config import ConvertConfig
    from clakit.uptrain.recipe import ModelSection
    from clakit.uptrain.student import planned_layout

    config = tiny_model("llama").config
    auto = ModelSection(source="s", convert=ConvertConfig(calib_data=["c.txt"]))
    assert planned_layout(auto, config) is None
    assert planned_layout(ModelSection(source="s", convert=ConvertConfig(factor=3)), config) == [0, 0, 0, 3]
    with pytest.raises(ClakitError, match="model.convert: --factor must be between"):  # as the conversion would
        planned_layout(ModelSection(source="s", convert=ConvertConfig(factor=9)), config)


# --- held-out text and calibration, composed ------------------------------------------------------------------------


@pytest.mark.parametrize("calib", ["train.txt", "."], ids=["the-train-file", "a-folder-holding-it"])
def test_calibration_on_the_train_text_whose_tail_is_held_out_is_refused_before_any_work(
    tiny_llama_checkpoint, corpus_dir, tmp_path, calib
):
    """Without data.eval the held-out text is the last data.eval_fraction of data.train, and the conversion's
    calibration windows are spread over its whole calib_data: calib_data naming data.train fitted the conversion on
    the held-out text (the data.eval rule compared data.eval only; --dry-run and the run passed). With data.eval
    the same calibration text is allowed."""
    model = {"source": str(tiny_llama_checkpoint), "convert": {"factor": 2, "init": "calibrated"}}
    model["convert"]["calib_data"] = [str(corpus_dir / calib)]
    data = {"train": [str(corpus_dir / "train.txt")], "eval": None, "eval_fraction": 0.2}
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus_dir, tmp_path / "run", model=model, data=data))
    with pytest.raises(ClakitError, match=r"is \(or holds\) training text .*train.txt, whose last data.eval_fraction"):
        uptrain(path, dry_run=True, quiet=True)
    if calib == "train.txt":  # (the folder holds heldout.txt too: as data.eval it is refused by the data.eval rule)
        assert uptrain(path, ["data.eval=[" + str(corpus_dir / "heldout.txt") + "]"], dry_run=True, quiet=True)


@pytest.mark.parametrize("calib,refused", [("train.txt", True), ("calib.txt", False)], ids=["tail-file", "earlier"])
def test_calibration_on_a_file_of_a_train_folder_is_refused_only_where_the_tail_was_cut(
    tokenizer, corpus_dir, calib, refused
):
    """data.train a folder (calib.txt, heldout.txt, train.txt, read in that order): the held-out tail is the end of
    train.txt. Calibrating on train.txt fits the held-out text; on calib.txt, which the tail never reaches, it is
    allowed (the recipe's rule compares the last train spec only: a file inside it is judged here, by content)."""
    from clakit.uptrain.packing import build_data
    from clakit.uptrain.recipe import DataSection, validate

    data = DataSection(train=[str(corpus_dir)], eval=None, eval_fraction=0.05, seq_len=32, eval_max_tokens=128)
    specs = [str(corpus_dir / calib)]
    recipe = tiny_recipe(corpus_dir, Path("unused"), data=dataclasses.asdict(data))
    recipe["model"] = {"source": "src", "convert": {"factor": 2, "calib_data": specs}}
    validate(load_recipe_from(recipe))  # the recipe's path rule lets both through: train.txt is inside the folder
    if refused:
        with pytest.raises(ClakitError, match=r"calib_data .*train.txt is \(or holds\) training text .*train.txt"):
            build_data(data, tokenizer, None, calib=specs)
    else:
        assert len(build_data(data, tokenizer, None, calib=specs).eval) == 4


def test_calibration_on_a_copy_of_the_train_text_whose_tail_is_held_out_is_refused_before_the_conversion(
    tiny_llama_checkpoint, corpus_dir, tmp_path, monkeypatch
):
    """The same text under another name: refused by content once the text is read, before the conversion."""
    from clakit.uptrain import student

    monkeypatch.setattr(student, "convert_source", lambda *a, **k: pytest.fail("the conversion ran"))
    copy = tmp_path / "text" / "calib.txt"
    copy.parent.mkdir()
    copy.write_text((corpus_dir / "train.txt").read_text())
    model = {"source": str(tiny_llama_checkpoint), "convert": {"factor": 2, "init": "calibrated"}}
    model["convert"]["calib_data"] = [str(copy)]
    data = {"train": [str(corpus_dir / "train.txt")], "eval": None, "eval_fraction": 0.2}
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus_dir, tmp_path / "run", model=model, data=data))
    with pytest.raises(ClakitError, match=r"calib_data .*calib.txt is \(or holds\) training text .*train.txt"):
        uptrain(path, quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml", "text"]


# --- starts nobody trained from --------------------------------------------------------------------------------------


def test_a_start_with_fewer_kv_heads_than_its_teacher_trains_and_saves_what_it_trained(
    tokenizer, corpus_dir, tmp_path, monkeypatch
):
    """KV heads merged (2 -> 1, clakit.convert.kvheads) then CLA2, distilled from the original with 2 KV heads: the
    teacher shares no K/V tensor with the student (other shapes) but every frozen one it can; the saved model read
    back with the Auto classes computes what the trained (unmerged) student computed."""
    from transformers import AutoModelForCausalLM

    from clakit.convert.kvheads import merge_kv_heads
    from clakit.uptrain import pipeline, student

    original = save_checkpoint(tiny_model("llama", seed=3), tokenizer, tmp_path / "orig")
    merged = save_checkpoint(merge_kv_heads(tiny_model("llama", seed=3), 1), tokenizer, tmp_path / "kv1")
    ids, seen, merge = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0)), {}, student.merged

    def capture(model, dtype=None):
        with torch.no_grad():
            seen["logits"] = model.eval()(input_ids=ids).logits
        return merge(model, dtype)

    monkeypatch.setattr(pipeline.student, "merged", capture)
    sections = {
        "model": {"source": str(merged), "original": str(original), "convert": {"factor": 2, "init": "mean"}},
        "train": {"max_steps": 3, "save_steps": 0, "warmup_steps": 0},
        "lora": {"full_train": ["q_proj", "k_proj", "v_proj"], "lora_dropout": 0.0},
        "distill": {"weight": 1.0, "hidden_mse_weight": 0.1},
    }
    out = uptrain(write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus_dir, tmp_path / "run", **sections)), quiet=True)
    first = train_lines(out.parent)[0]
    assert first["kl"] > 0 and first["hidden_mse"] > 0  # the teacher (2 KV heads) differs from the student (1)
    saved = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert saved.config.num_key_value_heads == 1 and saved.config.kv_source_layers == [0, 0, 2, 2]
    with torch.no_grad():
        torch.testing.assert_close(saved(input_ids=ids).logits, seen["logits"], rtol=1e-5, atol=1e-5)
    record = json.loads((out / "uptrain.json").read_text())
    assert record["original"]["path"] == str(original) and record["conversion"]["source"]["path"] == str(merged)


def test_fsdp_with_an_interleaved_layout_trains_like_one_process(tokenizer, corpus_dir, tmp_path):
    """FSDP2 on 2 gloo processes (accelerate's own preparation, tests/accelerate_fsdp_cpu.py) with the layout
    [0, 0, 2, 0] (layer 3 reads layer 0's K/V across a producer of its own) and a tied lm_head trained in full:
    the weights and reports of one process of twice the batch."""
    from test_uptrain_distributed import launch, two_process_recipe, weights
    from test_uptrain_fsdp_pipeline import launch_fsdp

    from clakit.convert.inmemory import cla_model_from

    original = save_checkpoint(tiny_model("llama", tie_word_embeddings=True), tokenizer, tmp_path / "orig")
    cla = cla_model_from(tiny_model("llama", tie_word_embeddings=True), [0, 0, 2, 0], "mean")
    start = save_checkpoint(cla, tokenizer, tmp_path / "cla")
    for name, batch in (("one", 2), ("two", 1)):
        recipe = two_process_recipe(corpus_dir, tmp_path / name, start, original, batch)
        recipe["lora"]["full_train"] = ["k_proj", "v_proj", "consumers.q_proj", "lm_head"]
        args = ["uptrain", str(write_recipe(tmp_path / f"{name}.yaml", recipe)), "-q"]
        proc = launch(args, tmp_path, 1) if name == "one" else launch_fsdp(args, tmp_path, FSDP_VERSION="2")
        assert proc.returncode == 0, proc.stderr[-4000:]
    a, b, s = weights(tmp_path / "one" / "model"), weights(tmp_path / "two" / "model"), weights(start)
    assert set(a) == set(b) == set(s)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.equal(b["model.embed_tokens.weight"], s["model.embed_tokens.weight"])  # the tied head trained
    for report in ("original", "converted", "uptrained"):
        one, two = (json.loads((tmp_path / n / "eval" / f"{report}.json").read_text()) for n in ("one", "two"))
        assert two["perplexity"] == pytest.approx(one["perplexity"], rel=1e-4), report
    record = json.loads((tmp_path / "two" / "model" / "uptrain.json").read_text())
    assert (record["processes"], record["distributed_type"], record["kv_source_layers"]) == (2, "FSDP", [0, 0, 2, 0])


def test_a_consumer_pattern_on_a_layout_without_consumers_is_refused_for_that_reason():
    """Review of round 4: 7feef4d's refusal of a `consumers.` pattern said '(only producers hold k_proj/v_proj)'
    for any such pattern, also consumers.q_proj on a CLA-1 layout (no consumers at all), where it sent the user to
    look for a k_proj that was never asked for."""
    from clakit.errors import ClakitError
    from clakit.uptrain.student import meta_student, select_linear

    config = tiny_model("llama").config
    with pytest.raises(ClakitError, match=r"'consumers\.q_proj' matches no linear module \(the layout has no cons"):
        select_linear(meta_student(config, [0, 1, 2, 3]), ["consumers.q_proj"], "lora.full_train")
    with pytest.raises(ClakitError, match=r"'consumers\.\*\.\[kv\]_proj' matches no linear module \(only producers"):
        select_linear(meta_student(config, [0, 0, 2, 2]), ["consumers.*.[kv]_proj"], "lora.full_train")


def test_the_start_cards_serving_section_is_dropped_in_any_wording(tmp_path):
    """The start checkpoint's own "Serve with vLLM" section was removed from the nested card by its exact text:
    one an earlier clakit wrote (its install line was worded otherwise) stayed, a second serving section."""
    from clakit.convert.output_folder import serving_section
    from clakit.uptrain import card

    older = serving_section(2, 4).replace('"vllm==0.32.*" ./serving', "vllm ./serving")
    assert older != serving_section(2, 4)
    (tmp_path / "README.md").write_text(f"# converted\n\n{older}\nSettings and provenance in full: x.\n\n## Other\n")
    _, nested = card._nested_card({"kv_source_layers": [0, 0, 2, 2]}, tmp_path)
    assert "Serve with vLLM" not in nested and "Settings and provenance in full" in nested and "Other" in nested
