"""End-to-end uptraining on tiny models: the result, resume after a kill, and every bad input of the CLI."""

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from uptrain_fixtures import killed_at_step, tiny_cla_checkpoint, tiny_recipe, write_recipe  # noqa: F401

from clakit.cli import main
from clakit.uptrain import uptrain

RECIPES = Path(__file__).parent.parent / "recipes"


def weights(run: Path) -> dict:
    return load_file(run / "model" / "model.safetensors")


def test_source_converted_on_the_fly_trained_merged_and_saved(tiny_llama_checkpoint, corpus_dir, tmp_path, capsys):
    """LoRA + full-trained producer K/V and consumer q_proj + distillation; the result is a CLA checkpoint that
    loads with trust_remote_code alone, with card, provenance, metrics and before/after numbers. Its messages name
    the converted folder where it is found (they named the hidden staging folder: `.run.XXXXXXXX.partial/converted`,
    gone once the run was published)."""
    out = tmp_path / "run"
    recipe = tiny_recipe(
        corpus_dir,
        out,
        model={"source": str(tiny_llama_checkpoint), "convert": {"factor": 2, "init": "mean"}},
        lora={"full_train": ["k_proj", "v_proj", "consumers.q_proj"]},
        distill={"weight": 0.5, "temperature": 2.0, "hidden_mse_weight": 0.1},
        train={"eval_steps": 3},
    )
    result = uptrain(write_recipe(tmp_path / "r.yaml", recipe), quiet=False)
    assert result == out / "model"
    said = capsys.readouterr().err
    assert f"into {out / 'converted'}" in said and f"wrote {out / 'converted'}: layout" in said
    assert ".partial" not in said
    for name in ("configuration_cla.py", "modeling_cla.py", "README.md", "uptrain.json", "tokenizer.json"):
        assert (result / name).is_file(), name
    reports = {n: json.loads((out / "eval" / f"{n}.json").read_text()) for n in ("original", "converted", "uptrained")}
    assert reports["uptrained"]["perplexity"] < reports["converted"]["perplexity"]  # 6 steps, lr 3e-3, easy text
    assert (
        reports["uptrained"]["kv_cache"]["producer_layers"] == 2
        and reports["original"]["kv_cache"]["producer_layers"] == 4
    )
    assert (out / "report" / "report.md").is_file()
    card = (result / "README.md").read_text()
    for name in reports:
        assert f"{reports[name]['perplexity']:.2f}" in card
    # how to serve it: CLA2 on 4 layers keeps 2 producers, so vLLM holds 2.00x the source's tokens per cache byte
    assert "## Serve with vLLM" in card and "K/V for the 2 producer layers only" in card and "2.00x" in card
    record = json.loads((result / "uptrain.json").read_text())
    assert record["train_tokens"] == 6 * 2 * 32
    assert 0 < record["trainable_parameters"] < record["parameters"]
    # the model's own parameters, as saved (LoRA merged): the adapters' were counted in it (helper 50a)
    saved = sum(t.numel() for t in load_file(result / "model.safetensors").values())
    assert record["parameters"] == saved and 0 < record["adapter_parameters"] < record["trainable_parameters"]
    assert f"of them in the LoRA adapters, merged into the weights), of {saved:,} in the model" in card
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert [x["step"] for x in steps] == [1, 2, 3, 4, 5, 6]
    assert all({"ce", "kl", "hidden_mse", "tokens_per_s", "lr"} <= set(x) for x in steps)
    assert steps[0]["lr"] == 0.0 < steps[-1]["lr"]  # the rate each step trained at: warmup's first step is at 0
    assert [(x["event"], x["step"]) for x in lines if "event" in x] == [("eval", 0), ("eval", 3), ("eval", 6)]
    # safetensors' writer makes its files 0600: the weights must be as readable as the rest of the folder
    umask = os.umask(0)
    os.umask(umask)
    written = sorted(out.rglob("*.safetensors"))
    assert result / "model.safetensors" in written and any("checkpoints" in p.parts for p in written)
    assert {p: p.stat().st_mode & 0o777 for p in written} == dict.fromkeys(written, 0o666 & ~umask)

    # trained tensors changed, frozen ones did not (merged LoRA changes q/o/gate; full_train changes k/v)
    start_w = load_file(out / "converted" / "model.safetensors")
    final = weights(out)
    assert set(final) == set(start_w)

    def same(name):
        return torch.equal(final[f"model.layers.{name}.weight"], start_w[f"model.layers.{name}.weight"])

    assert not same("0.self_attn.k_proj") and not same("1.self_attn.q_proj") and not same("1.mlp.gate_proj")
    assert same("1.mlp.up_proj") and same("0.input_layernorm")

    # loads without clakit, through the copied remote code, and gives the logits the in-process classes give
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM;"
        f"m = AutoModelForCausalLM.from_pretrained({str(result)!r}, trust_remote_code=True);"
        "assert 'clakit' not in sys.modules, 'loaded through clakit';"
        "print(type(m).__module__, m(torch.arange(12)[None]).logits.sum().item())"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    module, logit_sum = proc.stdout.split()
    assert module.startswith("transformers_modules")
    from transformers import AutoModelForCausalLM

    local = AutoModelForCausalLM.from_pretrained(result)
    assert float(logit_sum) == pytest.approx(local(torch.arange(12)[None]).logits.sum().item(), rel=1e-5)


def test_killed_run_resumes_to_the_same_weights(tiny_cla_checkpoint, corpus_dir, tmp_path):  # noqa: F811
    """Uninterrupted 6 steps == killed at step 5 (last checkpoint: step 4), then --resume. Dropout is on, so the
    RNG state must be restored too, and the data position must continue where the checkpoint left it."""
    base = {"model": {"path": str(tiny_cla_checkpoint)}, "lora": {"full_train": ["k_proj"]}}
    full = tiny_recipe(corpus_dir, tmp_path / "full", **base)
    uptrain(write_recipe(tmp_path / "full.yaml", full), quiet=True)

    killed = tiny_recipe(corpus_dir, tmp_path / "killed", **base)
    path = write_recipe(tmp_path / "killed.yaml", killed)
    killed_at_step(5, path)
    assert not (tmp_path / "killed" / "model").exists()
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == ["step-000002", "step-000004"]

    assert main(["uptrain", str(path), "--resume", "-q"]) == 0
    a, b = weights(tmp_path / "full"), weights(tmp_path / "killed")
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-2:] == [5, 6]  # steps 5 and 6 redone after the resume


def test_a_resume_holds_its_run_from_its_check_on(tiny_cla_checkpoint, corpus_dir, tmp_path, monkeypatch):  # noqa: F811
    """--resume took its lock only when training began, after loading its models (minutes at 70B): an --overwrite
    started meanwhile passed its check and lost its work at its publish. Held from the resume's check on now."""
    from clakit import outputs
    from clakit.uptrain import pipeline

    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus_dir, tmp_path / "run", model={
        "path": str(tiny_cla_checkpoint)}))  # fmt: skip
    killed_at_step(3, path)
    held_while_loading = []
    load = pipeline._check_models

    def loading(*args):
        held_while_loading.append(outputs.in_use(tmp_path / "run"))  # as another process would see it
        return load(*args)

    monkeypatch.setattr(pipeline, "_check_models", loading)
    assert main(["uptrain", str(path), "--resume", "-q"]) == 0
    assert held_while_loading == [True] and not outputs.in_use(tmp_path / "run")


# --- bad input: exit 2, one line, nothing written ----------------------------------------------------------------


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main(["uptrain", *map(str, args), "-q"])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_refused(capsys, out: Path, args, message: str, before: set | None = None) -> None:
    code, err = run_cli(capsys, *args)
    assert code == 2
    assert err.startswith("clakit: error: ") and "\n" not in err and "Traceback" not in err
    assert message in err, err
    siblings = {p.name for p in out.parent.iterdir()}
    assert not any(n.endswith(".partial") for n in siblings)
    if before is None:
        assert not out.exists()
    else:
        assert {p.name for p in out.rglob("*")} == before


def test_missing_recipe(capsys, tmp_path):
    assert_refused(capsys, tmp_path / "run", [tmp_path / "nope.yaml"], "nope.yaml does not exist")


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_step=3", "unknown recipe key 'train.max_step' (did you mean train.max_steps?); valid keys here: "
                              "output_dir, max_steps"),
        ("train.max_steps=three", "train.max_steps must be an integer"),
    ],
)
def test_unknown_key_and_wrong_type(capsys, tmp_path, corpus_dir, tiny_cla_checkpoint, override, message):  # noqa: F811
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus_dir, out, model={"path": str(tiny_cla_checkpoint)}))
    assert_refused(capsys, out, [path, override], message)


def test_data_missing_or_too_short(capsys, tmp_path, corpus_dir, tiny_cla_checkpoint):  # noqa: F811
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus_dir, out, model={"path": str(tiny_cla_checkpoint)}))
    assert_refused(capsys, out, [path, f"data.train=[{tmp_path / 'missing.txt'}]"], "missing.txt' does not exist")
    (tmp_path / "short.txt").write_text("Too short to fill one sequence.")
    assert_refused(capsys, out, [path, f"data.train=[{tmp_path / 'short.txt'}]"], "fewer than one sequence")
    assert_refused(capsys, out, [path, f"data.eval=[{tmp_path / 'short.txt'}]"], "held-out data")


def test_model_not_cla_and_no_convert_settings(capsys, tmp_path, corpus_dir, tiny_llama_checkpoint):
    out = tmp_path / "run"
    recipe = tiny_recipe(corpus_dir, out, model={"path": str(tiny_llama_checkpoint)})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert_refused(capsys, out, [path], "is not a CLA checkpoint (model_type 'llama')")
    recipe["model"] = {"source": str(tiny_llama_checkpoint)}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert_refused(capsys, out, [path], "no model.convert settings")


def test_output_dir_of_another_run_and_resume_of_a_different_recipe(capsys, tmp_path, corpus_dir, tiny_cla_checkpoint):  # noqa: F811
    out = tmp_path / "run"
    recipe = tiny_recipe(corpus_dir, out, model={"path": str(tiny_cla_checkpoint)}, train={"max_steps": 2})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert run_cli(capsys, path)[0] == 0
    before = {p.name for p in out.rglob("*")}
    assert_refused(capsys, out, [path], "already exists; its run has finished (its model is", before)
    changed = [path, "train.learning_rate=1e-2", "--resume"]
    assert_refused(capsys, out, changed, "train.learning_rate: 0.003 -> 0.01", before)
    assert "save_steps" not in run_cli(capsys, *changed, "train.save_steps=7")[1]  # may change: not named
    assert_refused(capsys, out, [path, "--resume", "--overwrite"], "contradict", before)
    # --overwrite replaces the old run; a recipe-compatible --resume of a finished run just returns its result
    assert run_cli(capsys, path, "--overwrite", "train.max_steps=3")[0] == 0
    assert json.loads((out / "model" / "uptrain.json").read_text())["steps"] == 3


def test_resume_after_the_text_changed_is_refused(capsys, tmp_path, corpus_dir, tiny_cla_checkpoint):  # noqa: F811
    """The batch order is a function of the step and the blocks: a resume on edited text would not continue the run
    it claims to continue. Killed at step 3 (checkpoint step 2), the train text edited, --resume is one line."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.txt", "heldout.txt"):
        (data / name).write_text((corpus_dir / name).read_text())
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(data, out, model={"path": str(tiny_cla_checkpoint)}))
    killed_at_step(3, path)
    (data / "train.txt").write_text("Edited. " + (data / "train.txt").read_text())
    before = {p.name for p in out.rglob("*")}
    capsys.readouterr()  # the killed run's output
    assert_refused(capsys, out, [path, "--resume"], "the training or held-out text changed since the run", before)


def test_tensorboard_requested_but_missing(capsys, tmp_path, corpus_dir, tiny_cla_checkpoint, monkeypatch):  # noqa: F811
    import importlib.util

    real = importlib.util.find_spec
    hide = lambda name, *a: None if name == "tensorboard" else real(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", hide)
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus_dir, out, model={"path": str(tiny_cla_checkpoint)}))
    assert_refused(capsys, out, [path, "train.report_to=[tensorboard]"], "pip install tensorboard")


def test_dry_run_prints_the_resolved_recipe_and_writes_nothing(capsys, tmp_path, corpus_dir, tiny_cla_checkpoint):  # noqa: F811
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus_dir, out, model={"path": str(tiny_cla_checkpoint)}))
    assert main(["uptrain", str(path), "train.max_steps=9", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "max_steps: 9" in printed and "learning_rate: 0.003" in printed
    assert not out.exists()


def test_dry_run_refuses_a_missing_path_that_is_no_hub_id(capsys, tmp_path, corpus_dir, tiny_cla_checkpoint):  # noqa: F811
    """`runs/a/b` has a slash but is no org/name: --dry-run passed it as a Hub id, the real run refused it."""
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus_dir, tmp_path / "run", model={"path": "runs/a/b"}))
    assert main(["uptrain", str(path), "--dry-run"]) == 2
    assert "model.path 'runs/a/b' does not exist" in capsys.readouterr().err
    # each model key is named as the run names it (it said "model 'x'" for any of the three)
    path = write_recipe(tmp_path / "o.yaml", tiny_recipe(corpus_dir, tmp_path / "run", model={
        "path": str(tiny_cla_checkpoint), "original": str(tmp_path / "gone")}))  # fmt: skip
    assert main(["uptrain", str(path), "--dry-run"]) == 2
    assert f"model.original '{tmp_path / 'gone'}' does not exist" in capsys.readouterr().err


def test_smollm2_cpu_recipe_runs_end_to_end_on_a_tiny_model(tmp_path, corpus_dir, tiny_llama_checkpoint):
    """The shipped default recipe, with only its model/data/size overridden: its own settings must train."""
    out = tmp_path / "smol"
    overrides = [
        f"model.source={tiny_llama_checkpoint}",
        f"model.convert.calib_data=[{corpus_dir / 'calib.txt'}]",  # the recipe's own layout/init settings
        "model.convert.calib_tokens=1024",
        f"model.original={tiny_llama_checkpoint}",
        f"data.train=[{corpus_dir / 'train.txt'}]",
        f"data.eval=[{corpus_dir / 'heldout.txt'}]",
        "data.seq_len=32",
        "data.copy_span=8",  # the recipe's 32-token copies need windows of 64 or more
        "data.eval_max_tokens=64",
        "train.max_steps=3",
        "train.warmup_steps=2",  # the recipe's 5 would outlast the 3 steps (refused)
        "train.max_tokens=null",
        "train.per_device_train_batch_size=2",
        f"train.output_dir={out}",
    ]
    result = uptrain(RECIPES / "smollm2" / "135m_cla2_cpu.yaml", overrides, quiet=True)
    assert (result / "model.safetensors").is_file()
    card = (result / "README.md").read_text()
    assert "windows of 32; 0.5 of them end with a copy of an earlier span of 8 tokens" in card
    assert json.loads((result / "uptrain.json").read_text())["steps"] == 3
    converted = json.loads((out / "converted" / "clakit_convert.json").read_text())["settings"]
    assert (converted["layout"], converted["init"], converted["kv_saving"]) == ("auto", "reconstruct", 0.5)


def test_distillation_without_a_known_original_model(capsys, tmp_path, corpus_dir, tiny_cla_checkpoint):  # noqa: F811
    out = tmp_path / "run"
    recipe = tiny_recipe(corpus_dir, out, model={"path": str(tiny_cla_checkpoint)}, distill={"weight": 1.0})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert_refused(capsys, out, [path], "distillation needs the original model as teacher: set model.original")
    assert_refused(capsys, out, [path, f"model.original={tmp_path / 'gone'}"], "does not exist")


def test_bf16_run_with_gradient_checkpointing_saves_one_dtype(tmp_path, corpus_dir, tiny_llama_checkpoint):
    """The GPU recipes' settings (bf16 autocast, gradient checkpointing), on CPU: the fully trained tensors are kept
    in fp32 while training and the result goes back to one dtype, so its forward runs outside autocast."""
    out = tmp_path / "bf16"
    recipe = tiny_recipe(
        corpus_dir,
        out,
        model={"source": str(tiny_llama_checkpoint), "convert": {"factor": 2, "init": "mean"}},
        train={"bf16": True, "gradient_checkpointing": True, "max_steps": 3, "eval_steps": 2},
        lora={"full_train": ["k_proj", "v_proj", "consumers.q_proj"]},
        distill={"weight": 0.5, "temperature": 2.0},
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = uptrain(write_recipe(tmp_path / "r.yaml", recipe), quiet=True)
    # transformers 5.24+ deprecates gradient_checkpointing_enable/disable (removed in v6): clakit calls the current
    # names (peft itself still reads `is_gradient_checkpointing`, which warns too: not ours)
    ours = ("`gradient_checkpointing_enable`", "`gradient_checkpointing_disable`")
    assert not [str(w.message) for w in caught if str(w.message).startswith(ours)]
    final = weights(out)
    assert {t.dtype for t in final.values()} == {torch.bfloat16}
    assert not torch.equal(
        final["model.layers.0.self_attn.k_proj.weight"],
        load_file(out / "converted" / "model.safetensors")["model.layers.0.self_attn.k_proj.weight"].bfloat16(),
    )
    uptrained = json.loads((out / "eval" / "uptrained.json").read_text())
    assert math.isfinite(uptrained["perplexity"]) and uptrained["kv_cache"]["dtype"] == "bfloat16"
    assert json.loads((result / "config.json").read_text())["dtype"] == "bfloat16"


def test_the_remote_code_and_pickle_flags_set_their_recipe_keys(capsys, tmp_path, corpus_dir, tiny_cla_checkpoint):  # noqa: F811
    """`clakit convert` takes --trust-remote-code / --allow-pickle; `clakit uptrain` took only the recipe keys, so
    the flag its users knew was refused as an unknown argument. Both flags now set model.trust_remote_code /
    model.allow_pickle, anywhere after the recipe, and the keys stay false without them."""
    recipe = tiny_recipe(corpus_dir, tmp_path / "run", model={"path": str(tiny_cla_checkpoint)})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert main(["uptrain", str(path), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "trust_remote_code: false" in printed and "allow_pickle: false" in printed
    assert main(["uptrain", str(path), "--trust-remote-code", "--dry-run", "train.max_steps=9", "--allow-pickle"]) == 0
    printed = capsys.readouterr().out
    assert "trust_remote_code: true" in printed and "allow_pickle: true" in printed and "max_steps: 9" in printed


def test_dry_run_refuses_a_one_step_warmup_as_the_run_does(capsys, tmp_path, corpus_dir, tiny_cla_checkpoint):  # noqa: F811
    """The check lived only in trainer.check_plan (after the data is read), so --dry-run passed a recipe the real run
    then refused. Known from the recipe alone (max_steps 1), it is now refused by both."""
    recipe = tiny_recipe(corpus_dir, tmp_path / "run", model={"path": str(tiny_cla_checkpoint)})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert main(["uptrain", str(path), "train.max_steps=1", "train.warmup_steps=1", "--dry-run"]) == 2
    assert "the run has 1 step and a warmup" in capsys.readouterr().err
    no_warmup = ["train.warmup_steps=0", "train.warmup_ratio=0"]
    assert main(["uptrain", str(path), "train.max_steps=1", *no_warmup, "--dry-run"]) == 0


def test_dry_run_refuses_a_conversion_shard_size_that_is_no_size(capsys, tmp_path, corpus_dir, tiny_llama_checkpoint):
    """model.convert.max_shard_size was checked by convert() only, once the run had read its data and started the
    conversion; --dry-run passed it. ConvertConfig now checks it with its other settings."""
    model = {"source": str(tiny_llama_checkpoint), "convert": {"factor": 2, "init": "mean", "max_shard_size": "abc"}}
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus_dir, tmp_path / "run", model=model))
    assert main(["uptrain", str(path), "--dry-run"]) == 2
    assert "--max-shard-size must be a size like 5GB" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a GPU this machine lacks")
@pytest.mark.parametrize(
    "convert, needle",
    [
        ({"calib_data": ["missing.txt"]}, "model.convert.calib_data 'missing.txt' does not exist"),
        ({"eval_data": ["missing.txt"]}, "model.convert.eval_data 'missing.txt' does not exist"),
        ({"device": "cuda"}, "recipe section model.convert: --device cuda: this machine has no CUDA GPU"),
        ({"dtype": "bfloat16", "device": "cpu"}, "recipe section model.convert: --dtype bfloat16 fits need a GPU"),
    ],
)
def test_dry_run_checks_the_conversions_text_and_device(capsys, tmp_path, corpus_dir, tiny_llama_checkpoint, convert, needle):  # noqa: E501
    """--dry-run checked the run's own text files and models but not the conversion's: a missing calibration file or
    a GPU this machine lacks passed it, to be refused by the run."""
    model = {"source": str(tiny_llama_checkpoint), "convert": {"factor": 2, "init": "mean", **convert}}
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus_dir, tmp_path / "run", model=model))
    assert main(["uptrain", str(path), "--dry-run"]) == 2
    assert needle in capsys.readouterr().err


def test_dry_run_checks_a_local_models_config_as_the_run_does(
    capsys, tmp_path, corpus_dir, tiny_cla_checkpoint, tiny_llama_checkpoint  # noqa: F811
):
    """--dry-run read no config, so a pattern naming the consumers' k_proj (which they do not hold), a data.seq_len
    beyond the model's window, or a stock model given as model.path passed it and were refused by the run."""
    recipe = tiny_recipe(corpus_dir, tmp_path / "run", model={"path": str(tiny_cla_checkpoint)})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert main(["uptrain", str(path), "lora.full_train=[consumers.k_proj]", "--dry-run"]) == 2
    assert "pattern 'consumers.k_proj' matches no linear module" in capsys.readouterr().err
    assert main(["uptrain", str(path), "data.seq_len=100000", "--dry-run"]) == 2
    assert "data.seq_len" in capsys.readouterr().err
    assert main(["uptrain", str(path), "lora.full_train=[producers.k_proj]", "--dry-run"]) == 0
    assert not (tmp_path / "run").exists()
    assert main(["uptrain", str(path), f"model.path={tiny_llama_checkpoint}", "--dry-run"]) == 2
    assert "is not a CLA checkpoint" in capsys.readouterr().err


def test_dry_run_refuses_a_conversion_layout_the_model_cannot_take(
    capsys, tmp_path, corpus_dir, tiny_llama_checkpoint  # noqa: F811
):
    """Review of round 4: --dry-run checked the LoRA patterns on the layout model.convert will write
    (student.planned_layout), but a layout the conversion refuses (3 entries for 4 layers, a factor beyond the
    layers) was taken as 'chosen later' and passed it (exit 0); the run then refused it. planned_layout is now the
    conversion's own rule (convert.pipeline.planned_layout), refusals included."""
    model = {"source": str(tiny_llama_checkpoint), "convert": {"kv_source_layers": [0, 0, 2], "init": "mean"}}
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus_dir, tmp_path / "run", model=model))
    assert main(["uptrain", str(path), "--dry-run"]) == 2
    assert "model.convert: invalid kv_source_layers: kv_source_layers has 3 entries" in capsys.readouterr().err
    factor = ["model.convert.kv_source_layers=null", "model.convert.factor=9"]
    assert main(["uptrain", str(path), *factor, "--dry-run"]) == 2
    assert "--factor must be between 1 and the number of layers (4), got 9" in capsys.readouterr().err
    assert main(["uptrain", str(path), "model.convert.kv_source_layers=[0,0,2,2]", "--dry-run"]) == 0
    assert not (tmp_path / "run").exists()


def test_a_run_started_before_the_bf16_refusal_resumes(tiny_llama_checkpoint, corpus_dir, tmp_path, monkeypatch):
    """convert now refuses --bf16 where nothing runs on data; a run started before, with model.convert {init: mean,
    bf16: true}, was refused on --resume (its conversion done, nothing converted again), and the fix the message
    gave (drop bf16) was refused as another recipe than run.json's: only --overwrite, losing the training (helper
    Q). A fresh run with that recipe is still refused."""
    from clakit.convert import pipeline as convert_pipeline
    from clakit.errors import ClakitError

    out = tmp_path / "run"
    model = {"source": str(tiny_llama_checkpoint), "convert": {"factor": 2, "init": "mean", "bf16": True}}
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus_dir, out, model=model))
    with pytest.raises(ClakitError, match="--bf16 computes the layout search"):
        uptrain(path, quiet=True)
    check = convert_pipeline._check_arguments
    monkeypatch.setattr(convert_pipeline, "_check_arguments", lambda *a: None)  # the code before the refusal
    killed_at_step(3, path)
    monkeypatch.setattr(convert_pipeline, "_check_arguments", check)
    assert (out / "checkpoints" / "step-000002").is_dir() and (out / "converted" / "config.json").is_file()
    assert uptrain(path, resume=True, quiet=True) == out / "model"
