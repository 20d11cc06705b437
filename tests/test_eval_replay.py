"""Break-it round 4, eval and report: provenance, replay and composed features.

A report must say where each number came from (every setting, the model's absolute path, the clakit run that made
the model), the recorded settings must give the same numbers again, and `clakit report` must label a mix of stock,
CLA, merged-KV-head, uptrained and older reports correctly."""

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from convert_fixtures import run_cli

from clakit.eval import EvalConfig, evaluate, report, write_json
from clakit.eval.passkey import PasskeySettings
from clakit.markup import md_text
from clakit.provenance import provenance

SETTINGS = dict(seq_len=32, max_tokens=256, batch_size=2, speed=False)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_llama_checkpoint) -> Path:
    """An interleaved (non-adjacent) CLA layout, written by `clakit convert`."""
    out = tmp_path_factory.mktemp("conv") / "cla"
    assert run_cli(tiny_llama_checkpoint, out, "--kv-source-layers", "0,1,0,1", "--init", "mean", "-q") == 0
    return out


@pytest.fixture(scope="module")
def uptrained(tmp_path_factory, converted, tiny_llama_checkpoint) -> Path:
    """A model folder as `clakit uptrain` leaves it: the weights, no clakit_convert.json (it would look like a
    convert output), and uptrain.json holding the start checkpoint's conversion record (clakit.uptrain.card)."""
    from clakit.uptrain import card

    out = tmp_path_factory.mktemp("up") / "run" / "model"
    shutil.copytree(converted, out)
    (out / "clakit_convert.json").unlink()
    original = {"spec": str(tiny_llama_checkpoint), "path": str(tiny_llama_checkpoint), "revision": None}
    record = {"steps": 3, "kv_source_layers": [0, 1, 0, 1], **card.origins(converted, original)}
    (out / card.PROVENANCE).write_text(json.dumps(provenance(**record), indent=1))
    return out


def test_the_record_file_names_are_the_ones_convert_and_uptrain_write():
    """eval may not import convert or uptrain (tests/test_packaging.py), so it names their records itself."""
    from clakit.convert.output_folder import RECORD_FILE
    from clakit.eval.kvcache import CONVERT_RECORD, UPTRAIN_RECORD
    from clakit.uptrain.card import PROVENANCE

    assert (CONVERT_RECORD, UPTRAIN_RECORD) == (RECORD_FILE, PROVENANCE)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_report_names_the_run_that_made_each_model(corpus_dir, tiny_llama_checkpoint, converted, uptrained):
    """provenance.origin: the conversion (source, its path, layout, command) of a converted model, the uptraining
    and the conversion it started from of an uptrained one, nothing for a stock one; model_path is absolute.
    Before: no origin at all, and an uptrained model's saving was measured against "stock layout"."""
    data = [str(corpus_dir / "heldout.txt")]
    stock, conv, up = (evaluate(m, data=data, quiet=True, **SETTINGS) for m in (tiny_llama_checkpoint, converted,
                                                                               uptrained))  # fmt: skip
    assert stock["provenance"]["origin"] is None
    assert stock["provenance"]["model_path"] == str(tiny_llama_checkpoint.absolute())
    origin = conv["provenance"]["origin"]
    assert origin["made_by"] == "clakit convert" and origin["source_path"] == str(tiny_llama_checkpoint)
    assert origin["kv_source_layers"] == [0, 1, 0, 1] and origin["init"] == "mean"
    assert origin["record_sha256"] == _sha256(converted / "clakit_convert.json")
    assert origin["command"] == json.loads((converted / "clakit_convert.json").read_text())["provenance"]["command"]
    origin = up["provenance"]["origin"]
    assert origin.get("made_by") == "clakit uptrain", up["provenance"].get("origin")
    assert origin["start_checkpoint"] == str(converted) and origin["steps"] == 3
    assert origin["conversion"]["source_path"] == str(tiny_llama_checkpoint)
    assert origin["record_sha256"] == _sha256(uptrained / "uptrain.json")
    # the saving is measured against the source the uptrained model's conversion read, as for the converted one
    assert up["kv_cache"]["source"] == conv["kv_cache"]["source"] == str(tiny_llama_checkpoint)
    assert up["kv_cache"]["saving_factor"] == conv["kv_cache"]["saving_factor"] == 2.0


def test_a_damaged_uptrain_record_is_refused_in_one_line(tmp_path, corpus_dir, uptrained):
    from clakit.errors import ClakitError

    damaged = shutil.copytree(uptrained, tmp_path / "model")
    (damaged / "uptrain.json").write_text("[1, 2]")
    with pytest.raises(ClakitError, match=r"uptrain.json is not an uptrain record \(not a JSON object\)"):
        evaluate(damaged, data=[str(corpus_dir / "heldout.txt")], quiet=True, **SETTINGS)


def test_the_recorded_settings_replay_the_same_numbers(tmp_path, monkeypatch, corpus_dir, converted):
    """Every EvalConfig field is recorded (against dataclasses.fields: a new one cannot be forgotten) with relative
    paths relative to the recorded cwd; evaluating again from there with the recorded config and passkey settings
    gives the same perplexity, KV bytes and passkey answers, bit for bit (CPU)."""
    shutil.copy(corpus_dir / "heldout.txt", tmp_path / "held.txt")
    monkeypatch.chdir(tmp_path)
    passkey = PasskeySettings(lengths=[200, 240], depths=[0, 1], samples=1, seed=3)
    first = evaluate(converted, data=["held.txt"], passkey=passkey, quiet=True, **SETTINGS)
    prov = first["provenance"]
    assert set(prov["config"]) == {f.name for f in dataclasses.fields(EvalConfig)}
    monkeypatch.chdir(prov["cwd"])
    config = EvalConfig(**prov["config"])
    fields = {f.name for f in dataclasses.fields(PasskeySettings)}
    recorded = first["passkey"]["settings"]
    assert set(recorded) - fields == {"new_tokens"}  # derived (5 digits + EXTRA_TOKENS), not a setting
    passkey = PasskeySettings(**{k: v for k, v in recorded.items() if k in fields})
    again = evaluate(prov["model_path"], config, passkey=passkey, quiet=True)
    for key in ("perplexity", "bits_per_byte", "num_tokens", "data", "settings", "kv_cache"):
        assert again[key] == first[key], key
    assert again["passkey"]["prompts"] == first["passkey"]["prompts"]


def _merged_kv_heads(tiny_llama_checkpoint, tokenizer, path: Path) -> Path:
    """The tiny Llama with its 2 KV heads merged into 1 (clakit.convert.kvheads), saved as a stock checkpoint."""
    from transformers import AutoModelForCausalLM

    from clakit.convert.kvheads import merge_kv_heads

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_checkpoint, dtype=torch.float32)
    merge_kv_heads(model, 1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _old_format(report_dict: dict) -> dict:
    """A report as clakit wrote it before kv_cache.dtype, speed.prefill_length, torch_threads, model_path and
    origin were recorded."""
    old = json.loads(json.dumps(report_dict))
    old["kv_cache"].pop("dtype")
    for key in ("torch_threads", "model_path", "origin"):
        old["provenance"].pop(key)
    return old


def test_a_report_of_every_kind_of_model_is_labelled(tmp_path, corpus_dir, tokenizer, tiny_llama_checkpoint,
                                                     converted, uptrained):  # fmt: skip
    """Stock, an interleaved CLA, a uniform CLA2, a merged-KV-head model (with --source-model), an uptrained one and
    a report in an older format, in one report: each row's KV bytes and saving, and its Sources line naming the run
    that made it."""
    uniform = tmp_path / "cla2"
    assert run_cli(tiny_llama_checkpoint, uniform, "--factor", "2", "--init", "mean", "-q") == 0
    merged = _merged_kv_heads(tiny_llama_checkpoint, tokenizer, tmp_path / "kv1")
    data = [str(corpus_dir / "heldout.txt")]
    models = [(tiny_llama_checkpoint, {}), (converted, {}), (uniform, {}),
              (merged, {"source_model": str(tiny_llama_checkpoint)}), (uptrained, {})]  # fmt: skip
    paths = []
    for i, (model, extra) in enumerate(models):
        r = evaluate(model, data=data, quiet=True, **SETTINGS, **extra)
        paths.append(write_json(_old_format(r) if i == 2 else r, tmp_path / f"r{i}.json"))
    md = (report(paths, tmp_path / "rep") / "report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and "perplexity" not in line]
    per_token = {line.split(" | ")[0][2:]: line.split(" | ")[4:6] for line in table}
    full = 4 * 2 * 2 * 12 * 4  # layers x K,V x KV heads x head_dim x fp32 bytes
    assert per_token == {tiny_llama_checkpoint.name: [f"{full:,}", "1.00"], "cla": [f"{full // 2:,}", "2.00"],
                         "cla2": [f"{full // 2:,}", "2.00"], "kv1": [f"{full // 2:,}", "2.00"],
                         "model": [f"{full // 2:,}", "2.00"]}  # fmt: skip
    sources = md.split("## Sources")[1]
    lines = {line.split(";")[0][len("- model: ") :]: line for line in sources.splitlines() if line.startswith("- ")}
    assert lines[md_text(tiny_llama_checkpoint.name)].endswith("made from: –")
    assert "made from: clakit convert (init mean; layout 0,1,0,1; " in lines["cla"]  # the fixture's conversion
    assert lines["cla"].endswith(md_text(f" of {tiny_llama_checkpoint}"))
    assert lines["cla2"].endswith("made from: –")  # the older report: not recorded, not guessed
    assert md_text(f"made from: clakit uptrain (3 steps) of {converted}") in lines["model"]
    assert lines["model"].endswith(md_text(f" of {tiny_llama_checkpoint}"))
    assert md_text(f"evaluated: {uptrained}") in lines["model"]


def test_models_evaluated_by_the_same_relative_path_from_different_folders_are_told_apart(
    tmp_path, monkeypatch, corpus_dir, tiny_llama_checkpoint, converted
):
    """`cd lr1 && clakit eval model ...`, `cd lr2 && clakit eval model ...`: two models, both recorded as "model".
    The labels read the recorded cwd. Before: "model (1)" and "model (2)", the numbering of one model given twice."""
    paths = []
    for run, source in (("lr1", converted), ("lr2", tiny_llama_checkpoint)):
        shutil.copytree(source, tmp_path / run / "model")
        monkeypatch.chdir(tmp_path / run)
        r = evaluate("model", data=[str(corpus_dir / "heldout.txt")], quiet=True, **SETTINGS)
        paths.append(write_json(r, tmp_path / f"{run}.json"))
    paths.append(paths[0])  # the same report twice is the same model twice: numbered
    md = (report(paths, tmp_path / "rep") / "report.md").read_text()
    table = [line for line in md.split("\n\n")[1].splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0][2:] for row in table] == ["lr1/model (1)", "lr2/model", "lr1/model (3)"]


def test_the_evaluate_module_says_which_windows_it_scored(tokenizer):
    """A default seq_len resolves to the model's window when that is shorter (1024 otherwise): the result must say
    which, or the number cannot be reproduced or compared. Before: no seq_len or stride in the result."""
    import evaluate as hf_evaluate
    from conftest import make_text, tiny_model

    from clakit.eval.metric import METRIC_PATH
    from clakit.eval.perplexity import perplexity

    model, text = tiny_model("llama", max_position_embeddings=64), make_text(1500, 2)
    scores = hf_evaluate.load(METRIC_PATH).compute(predictions=[text], model=model, tokenizer=tokenizer)
    assert (scores.get("seq_len"), scores.get("stride")) == (64, 64)
    again = perplexity(model, tokenizer, text, seq_len=scores["seq_len"], stride=scores["stride"])
    assert again == scores and perplexity(model, tokenizer, text, seq_len=64, stride=16)["stride"] == 16


def _cloze_task(folder: Path, rows: list[dict], name: str = "tiny_cloze") -> Path:
    """A local lm-eval multiple-choice task: a YAML reading the JSON-lines file beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    body = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'rows.jsonl'}\n"
            "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: choices\n"
            "doc_to_target: label\nmetric_list:\n  - metric: acc\n")  # fmt: skip
    (folder / f"{name}.yaml").write_text(body)
    return folder / f"{name}.yaml"


def test_one_lm_eval_task_name_with_other_documents_is_not_one_column(tmp_path, tokenizer):
    """The same task name scored on other documents (its local data edited between two runs) was put in one column
    of the lm-eval table, as if both models had answered the same questions. Its documents and prompts are now
    hashed into the report, and clakit report refuses to compare them; the same task read from another folder
    still compares."""
    from conftest import make_text, tiny_model

    from clakit.errors import ClakitError

    model, text = tiny_model("llama", max_position_embeddings=128), make_text(400, 5)
    words = text.split()
    rows = [{"question": " ".join(words[i : i + 6]), "choices": ["the of", "unto him", "hack mode", "a b"],
             "label": i % 4} for i in range(0, 48, 6)]  # fmt: skip
    run = dict(tokenizer=tokenizer, text=text, seq_len=32, speed=False, quiet=True)
    first = evaluate(model, lm_eval_tasks=str(_cloze_task(tmp_path / "a", rows)), **run)
    moved = evaluate(model, lm_eval_tasks=str(_cloze_task(tmp_path / "b", rows)), **run)
    assert first["lm_eval"]["task_hashes"] == moved["lm_eval"]["task_hashes"]  # same documents, same prompts
    edited = [{**r, "label": (r["label"] + 1) % 4} for r in rows]
    other = evaluate(model, lm_eval_tasks=str(_cloze_task(tmp_path / "c", edited)), **run)
    paths = [write_json(r, tmp_path / f"{n}.json") for n, r in (("a", first), ("b", moved), ("c", other))]
    assert (report(paths[:2], tmp_path / "same") / "report.md").is_file()
    with pytest.raises(ClakitError, match=r"lm-eval task tiny_cloze scored other documents \(lm_eval.task_hashes"):
        report(paths, tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()


@pytest.mark.parametrize(
    "kind, layout, dtype, kv_heads",
    [("llama", [0, 1, 0, 1], torch.float32, None),  # interleaved: a consumer before its group's second producer
     ("mistral", [0, 0, 2, 2], torch.float32, None),  # sliding window 16, windows of 48: past it
     ("mistral", [0, 1, 1, 1], torch.bfloat16, None),
     ("llama", None, torch.float32, 1)],  # 2 KV heads merged into 1 (clakit.convert.kvheads), --source-model given
)  # fmt: skip
def test_kv_bytes_computed_equal_what_the_cache_holds_in_every_composition(tmp_path, tokenizer, kind, layout, dtype,
                                                                           kv_heads):  # fmt: skip
    """The KV bytes a report gives per sequence are the bytes a DynamicCache holds after --seq-len tokens, and the
    saving is the stock model's bytes over this one's, whatever composes: layouts, a sliding window passed, bf16, and
    merged KV heads; the passkey test decodes through the same cache."""
    from conftest import make_text, save_checkpoint, tiny_model

    from clakit.convert.inmemory import cla_model_from
    from clakit.convert.kvheads import merge_kv_heads

    stock = tiny_model(kind)
    model = cla_model_from(stock, layout) if layout else merge_kv_heads(stock, kv_heads)
    folder = save_checkpoint(model.to(dtype), tokenizer, tmp_path / "model")
    source = save_checkpoint(tiny_model(kind), tokenizer, tmp_path / "stock")
    (tmp_path / "text.txt").write_text(make_text(3000, 9))
    passkey = PasskeySettings(lengths=[200], depths=[0.5], samples=1)
    r = evaluate(folder, data=[str(tmp_path / "text.txt")], seq_len=48, max_tokens=256, batch_size=2, speed=False,
                 quiet=True, source_model=str(source), passkey=passkey)  # fmt: skip
    kv, element = r["kv_cache"], torch.empty((), dtype=dtype).element_size()
    producers = len(set(layout)) if layout else 4
    heads = kv_heads or 2
    window = 16 if kind == "mistral" else 48  # decoding past it, a sliding layer holds its window's tokens
    assert kv["bytes_per_token"] == producers * 2 * heads * 12 * element
    assert kv["measured_bytes"] == kv["bytes_per_sequence"] == kv["bytes_per_token"] * 48  # after the prefill: all
    assert kv["bytes_per_sequence_decoding"] == kv["bytes_per_token"] * window
    assert kv["saving_factor"] == 4 * 2 / (producers * heads) and kv["dtype"] == str(dtype).removeprefix("torch.")
    assert r["passkey"]["cells"][0]["samples"] == 1


@pytest.mark.parametrize("asked", [{"dtype": "bfloat16"}, {"device": "cpu"}, {"device_map": "auto"}])
def test_placement_asked_for_an_in_memory_model_is_refused_not_recorded(tokenizer, asked):
    """evaluate(model, dtype="bfloat16") scored the fp32 model as it was while provenance.config said bfloat16
    (kv_cache.dtype float32 beside it). Now one line, before any work."""
    from conftest import make_text, tiny_model

    from clakit.errors import ClakitError

    name = next(iter(asked))
    with pytest.raises(ClakitError, match=f"{name}=.* applies to a checkpoint clakit loads; an in-memory model runs"):
        evaluate(tiny_model("llama"), tokenizer=tokenizer, text=make_text(300, 4), seq_len=32, speed=False,
                 quiet=True, **asked)  # fmt: skip


def test_lm_eval_scores_in_the_first_report_format_are_shown(tmp_path, tokenizer):
    """The first reports with lm-eval scores (before local tasks and their settings) held {task: {metric: value}}
    as the lm_eval section itself. clakit report read them as valid and dropped every score: no lm-eval table, no
    word. They are now shown, the version noted as not recorded; a damaged one is still refused by field."""
    from conftest import make_text, tiny_model

    from clakit.errors import ClakitError

    base = evaluate(tiny_model("llama"), tokenizer=tokenizer, text=make_text(300, 4), seq_len=32, speed=False,
                    quiet=True)  # fmt: skip
    paths = []
    for i, acc in enumerate((0.5, 0.25)):
        first_format = {**base, "model": f"m{i}", "lm_eval": {"hellaswag": {"acc": acc, "acc_stderr": 0.1}}}
        paths.append(write_json(first_format, tmp_path / f"{i}.json"))
    md = (report(paths, tmp_path / "rep") / "report.md").read_text()
    assert "| m0 | 0.5000 ± 0.1000 |" in md and "| m1 | 0.2500 ± 0.1000 |" in md, md
    assert "lm-evaluation-harness (version not recorded)" in md
    damaged = {**base, "lm_eval": {"hellaswag": {"acc": "high"}}}
    with pytest.raises(ClakitError, match="lm_eval must be a mapping of task -> {metric: number}"):
        report([write_json(damaged, tmp_path / "bad.json")], tmp_path / "rep2")


def test_a_first_format_lm_eval_score_of_nan_is_left_out_not_the_report_refused(tmp_path, tokenizer):
    """Review of round 4: the first lm-eval format kept every int/float lm-eval gave, NaN included (a stderr over one
    document; 83851cb drops them from then on), and clakit report read such a report (its scores unshown). eadc500's
    check of that format refused the whole report: 'lm_eval must be a mapping of task -> {metric: number} (its first
    format)'. A non-finite score is now left out of the table, as eval leaves it out of new reports."""
    from conftest import make_text, tiny_model

    base = evaluate(tiny_model("llama"), tokenizer=tokenizer, text=make_text(300, 4), seq_len=32, speed=False,
                    quiet=True)  # fmt: skip
    old = {**base, "model": "m0", "lm_eval": {"hellaswag": {"acc": 0.5, "acc_stderr": float("nan")}}}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))  # as clakit of 2026-11-25 wrote it: JSON NaN
    md = (report([path], tmp_path / "rep") / "report.md").read_text()
    assert "| m0 | 0.5000 |" in md, md


def test_perplexities_scored_in_different_dtypes_are_labelled_so(tmp_path, tokenizer):
    """One model scored in fp32 and in bf16: its perplexities differ by precision alone. The note named the cache's
    bytes only; it now says the perplexities were scored at different precisions, and says nothing for one dtype."""
    from conftest import make_text, tiny_model

    run = dict(tokenizer=tokenizer, text=make_text(300, 68), seq_len=32, speed=False, quiet=True)
    fp32 = write_json(evaluate(tiny_model(), name="fp32", **run), tmp_path / "fp32.json")
    bf16 = write_json(evaluate(tiny_model().to(torch.bfloat16), name="bf16", **run), tmp_path / "bf16.json")
    mixed = (report([fp32, bf16], tmp_path / "mixed") / "report.md").read_text()
    assert "The models ran in different dtypes (float32, bfloat16): their perplexities differ by precision" in mixed
    same = (report([fp32, fp32], tmp_path / "same") / "report.md").read_text()
    assert "different dtypes" not in same


def test_the_origin_names_a_gguf_source_by_its_content(tmp_path, converted):
    """A .gguf file has no revision: the converter records its sha256, and the eval report's origin carries it
    (before: the origin named the file's path only, which another file can take)."""
    from clakit.eval.lineage import origin

    folder = shutil.copytree(converted, tmp_path / "cla")
    record = json.loads((folder / "clakit_convert.json").read_text())
    record["source"] = {**record["source"], "kind": "gguf", "path": "/models/m.gguf", "sha256": "ab" * 32}
    (folder / "clakit_convert.json").write_text(json.dumps(record))
    found = origin(folder)
    assert (found["source_path"], found.get("source_sha256")) == ("/models/m.gguf", "ab" * 32)


def test_reports_at_other_batch_sizes_compare_and_say_so(tmp_path, tokenizer):
    """A CLA model is evaluated at the larger batch its smaller cache allows; windows score alike at any batch (the
    perplexities below are equal), yet `clakit report` refused the pair as made with other settings."""
    from conftest import make_text, tiny_model

    run = dict(tokenizer=tokenizer, text=make_text(300, 68), seq_len=32, speed=False, quiet=True)
    small = evaluate(tiny_model(), name="b1", batch_size=1, **run)
    large = evaluate(tiny_model(), name="b8", batch_size=8, **run)
    assert small["perplexity"] == large["perplexity"]
    paths = [write_json(small, tmp_path / "b1.json"), write_json(large, tmp_path / "b8.json")]
    md = (report(paths, tmp_path / "rep") / "report.md").read_text()
    assert "batch size 1 (b1), 8 (b8)." in md, md
    same = (report([paths[0], paths[0]], tmp_path / "same") / "report.md").read_text()
    assert "batch size 1." in same


def _fitted_model(tmp_path, converted, calib: Path, relative: bool) -> Path:
    """A copy of `converted` whose conversion record says it was calibrated on `calib` (typed relative to the
    recorded cwd when `relative`, as `clakit convert --calib-data calib.txt` run there records it)."""
    model = shutil.copytree(converted, tmp_path / "fitted")
    record = json.loads((model / "clakit_convert.json").read_text())
    record["settings"]["calib_data"] = [calib.name if relative else str(calib)]
    record["provenance"]["cwd"] = str(calib.parent)
    (model / "clakit_convert.json").write_text(json.dumps(record))
    return model


def test_a_model_calibrated_on_a_folder_is_found_fitted_on_a_file_of_it(tmp_path, corpus_dir, converted):
    """A conversion record whose settings.calib_data names a folder (clakit records the files it read; a record
    written by hand or another tool may name the folder): its files count as fitted on."""
    model = _fitted_model(tmp_path, converted, corpus_dir, relative=False)
    calib = str(corpus_dir / "calib.txt")
    scored = evaluate(model, data=[calib], quiet=True, **SETTINGS)
    assert scored["data"]["fitted_on"] == {"text": calib, "fitted": calib}


@pytest.mark.parametrize("relative", [False, True])
def test_text_the_model_was_fitted_on_is_scored_but_not_called_held_out(tmp_path, capsys, corpus_dir, converted,
                                                                        relative):  # fmt: skip
    """--data that is the model's calibration text (here a copy under another name, found by content) is scored as
    asked, but said on stderr and recorded as data.fitted_on, and `clakit report` says the row is not held out;
    held-out text gets data.fitted_on null and no note. The origin names the calibration text and its sha256.
    Before: nothing said it, and the report read as held-out numbers."""
    model = _fitted_model(tmp_path, converted, corpus_dir / "calib.txt", relative)
    copy = shutil.copy(corpus_dir / "calib.txt", tmp_path / "other-name.txt")
    fitted = evaluate(model, data=[str(copy)], **SETTINGS)
    assert "is text this model was fitted on" in capsys.readouterr().err
    assert fitted["data"]["fitted_on"] == {"text": str(copy), "fitted": str(corpus_dir / "calib.txt")}
    assert fitted["provenance"]["origin"]["calib_data"] == ["calib.txt" if relative else str(corpus_dir / "calib.txt")]
    held = evaluate(model, data=[str(corpus_dir / "heldout.txt")], **SETTINGS)
    assert held["data"]["fitted_on"] is None and "fitted on" not in capsys.readouterr().err
    other = evaluate(converted, data=[str(copy)], quiet=True, **SETTINGS)  # mean init: fitted on no text
    assert other["data"]["fitted_on"] is None
    paths = [write_json(other, tmp_path / "a.json"), write_json(fitted, tmp_path / "b.json")]
    md = (report(paths, tmp_path / "rep") / "report.md").read_text()
    assert md.count("its perplexity is not held out") == 1, md


def test_text_an_uptrained_model_trained_on_is_found_down_its_chain(tmp_path, corpus_dir, uptrained):
    """An uptrained model's training text (uptrain.json's train_data, relative to its cwd) counts as fitted on."""
    model = shutil.copytree(uptrained, tmp_path / "model")
    record = json.loads((model / "uptrain.json").read_text())
    record.update(train_data=["train.txt"], cwd=str(corpus_dir))
    (model / "uptrain.json").write_text(json.dumps(record))
    scored = evaluate(model, data=[str(corpus_dir)], quiet=True, **SETTINGS)  # the folder holds train.txt
    train = str(corpus_dir / "train.txt")
    assert scored["data"]["fitted_on"] == {"text": train, "fitted": train}


def test_the_report_names_the_model_it_read_by_content(tmp_path, corpus_dir, converted):
    """A local folder was named by its path alone (provenance.model_path): a report could not tell which weights it
    scored once they changed. provenance.model_files names config.json and the tokenizer files by sha256 and each
    safetensors file by its size and header's sha256, as convert's source.files does; another config, another entry."""
    model = shutil.copytree(converted, tmp_path / "model")

    def files() -> dict:
        return evaluate(model, data=[str(corpus_dir / "heldout.txt")], quiet=True, **SETTINGS)["provenance"][
            "model_files"]  # fmt: skip

    first = files()
    assert first["config.json"]["sha256"] == _sha256(model / "config.json")
    assert first["tokenizer.json"]["sha256"] == _sha256(model / "tokenizer.json")
    shards = sorted(p.name for p in model.glob("*.safetensors"))
    assert shards and all(first[n]["bytes"] == (model / n).stat().st_size for n in shards)
    assert all(len(first[n]["header_sha256"]) == 64 for n in shards)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "note": "edited"}))
    again = files()
    assert again["config.json"] != first["config.json"] and again[shards[0]] == first[shards[0]]
