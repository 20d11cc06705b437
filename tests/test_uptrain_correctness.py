"""General-case correctness of `clakit uptrain`: what a run reads, trains, merges and records, checked against
independent computations on tiny models. Each fix's test failed before it."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import save_checkpoint, tiny_kwargs, tiny_model
from safetensors.torch import load_file
from uptrain_fixtures import killed_at_step, tiny_cla_checkpoint, tiny_recipe, write_recipe  # noqa: F401

from clakit.cli import main


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main(["uptrain", *map(str, args), "-q"])
    return code, capsys.readouterr().err.strip()


# --- what a run may execute: model.trust_remote_code / model.allow_pickle -----------------------------------------

CUSTOM_TOKENIZER = (
    "from transformers import PreTrainedTokenizerFast\n\n\nclass CustomTokenizer(PreTrainedTokenizerFast):\n    pass\n"
)


@pytest.fixture(scope="module")
def code_running_source(tokenizer, tmp_path_factory) -> Path:
    """A stock Llama as some Hub releases ship it: a tokenizer class in a .py beside the weights (tokenizer_config's
    auto_map; early Yi did this) and pickle weights (pytorch_model.bin) only. Reading either runs its code."""
    path = save_checkpoint(tiny_model("llama"), tokenizer, tmp_path_factory.mktemp("code_src"), "10MB")
    (path / "tokenization_custom.py").write_text(CUSTOM_TOKENIZER)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config |= {"auto_map": {"AutoTokenizer": [None, "tokenization_custom.CustomTokenizer"]}}
    (path / "tokenizer_config.json").write_text(json.dumps(config | {"tokenizer_class": "CustomTokenizer"}))
    torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    return path


def test_a_source_that_runs_its_own_code_needs_the_recipes_keys_and_then_trains(
    code_running_source, corpus_dir, tmp_path, capsys
):
    """uptrain had no setting for either: the refusals named convert's --trust-remote-code / --allow-pickle, which
    `clakit uptrain` does not have, and model.convert.allow_pickle converted, then failed loading the teacher."""
    out = tmp_path / "run"
    recipe = tiny_recipe(corpus_dir, out, train={"max_steps": 2, "save_steps": 0}, distill={"weight": 1.0})
    recipe["model"] = {"source": str(code_running_source), "convert": {"factor": 2, "init": "mean"}}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    for given, named in (
        ([], "set model.allow_pickle=true"),
        (["model.allow_pickle=true"], "set model.trust_remote_code=true"),
        (["model.convert.trust_remote_code=true", "model.allow_pickle=true"], "set model.trust_remote_code=true"),
        (["model.convert.allow_pickle=true"], "set model.allow_pickle=true"),
    ):
        code, err = run_cli(capsys, path, *given)
        assert code == 2 and named in err and "\n" not in err, (given, err)
        assert "pass --" not in err  # the recipe key (and uptrain's flag for it), not convert's wording
        assert not out.exists()  # refused before the conversion
    assert run_cli(capsys, path, "model.trust_remote_code=true", "model.allow_pickle=true") == (0, "")
    record = json.loads((out / "model" / "uptrain.json").read_text())
    assert record["recipe"]["model"]["trust_remote_code"] and record["recipe"]["model"]["allow_pickle"]
    original = json.loads((out / "eval" / "original.json").read_text())  # the teacher (pickle, custom tokenizer)
    assert original["provenance"]["model_path"] == str(code_running_source)  # named (was null: an in-memory model)


def test_pickle_cla_weights_train_with_model_allow_pickle(tiny_cla_checkpoint, corpus_dir, tmp_path, capsys):  # noqa: F811
    """model.path's own weights as pytorch_model.bin: the refusal named model.allow_pickle=true, which the student's
    load then ignored (refused again, after the data was read). Now checked first and honoured."""
    start = tmp_path / "cla"
    shutil.copytree(tiny_cla_checkpoint, start)
    weights = {k: v for f in sorted(start.glob("*.safetensors")) for k, v in load_file(f).items()}
    for f in [*start.glob("*.safetensors"), *start.glob("*.safetensors.index.json")]:
        f.unlink()
    torch.save(weights, start / "pytorch_model.bin")
    out = tmp_path / "run"
    train = {"max_steps": 2, "save_steps": 0}
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus_dir, out, model={"path": str(start)}, train=train))
    code, err = run_cli(capsys, path)
    assert code == 2 and "set model.allow_pickle=true" in err and not out.exists()
    assert run_cli(capsys, path, "model.allow_pickle=true") == (0, "")
    assert sorted(weights) == sorted(tensors_of(out / "model"))


def test_what_a_run_may_read_is_outside_its_fingerprint(tmp_path, corpus_dir, monkeypatch):
    """model.trust_remote_code / allow_pickle say what may be read, not what is trained: a run recorded before the
    keys existed (its recipe dict without them) resumes, and a resume may add them."""
    from clakit.uptrain import load_recipe
    from clakit.uptrain.recipe import Recipe

    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus_dir, tmp_path / "run", model={"path": "some/cla"}))
    plain, given = load_recipe(path), load_recipe(path, ["model.trust_remote_code=true", "model.allow_pickle=true"])
    assert plain.fingerprint() == given.fingerprint() != load_recipe(path, ["lora.r=2"]).fingerprint()
    to_dict = Recipe.to_dict

    def before_the_keys(self):
        d = to_dict(self)
        return d | {"model": {k: v for k, v in d["model"].items() if k not in ("trust_remote_code", "allow_pickle")}}

    monkeypatch.setattr(Recipe, "to_dict", before_the_keys)
    assert given.fingerprint() == plain.fingerprint()


# --- the saved model is the trained one ----------------------------------------------------------------------------

# attention and MLP biases, a head_dim that is not hidden / heads, tied embeddings: each changes what a merge writes
ODD_SHAPES = {"attention_bias": True, "mlp_bias": True, "head_dim": 16, "tie_word_embeddings": True}
ODD_LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["o_proj", "gate_proj", "down_proj"]}
ODD_FULL = ["k_proj", "v_proj", "consumers.q_proj", "lm_head"]


@pytest.fixture(scope="module")
def odd_source(tokenizer, tmp_path_factory) -> Path:
    return save_checkpoint(
        tiny_model("llama", seed=5, **ODD_SHAPES), tokenizer, tmp_path_factory.mktemp("odd"), "10MB"
    )


@pytest.fixture(scope="module")
def odd_cla_checkpoint(odd_source, tokenizer, tmp_path_factory) -> Path:
    """odd_source converted to CLA2 (mean init), saved as the converter does."""
    from clakit.convert.inmemory import cla_model_from
    from clakit.convert.layout import uniform_layout

    cla = cla_model_from(tiny_model("llama", seed=5, **ODD_SHAPES), uniform_layout(4, 2), "mean")
    return save_checkpoint(cla, tokenizer, tmp_path_factory.mktemp("odd_cla2"), "10MB")


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("bf16", [False, True])
def test_the_saved_model_computes_what_the_trained_model_computed(
    odd_cla_checkpoint, corpus_dir, tmp_path, monkeypatch, bf16
):
    """The trained (LoRA unmerged) student's logits, captured as the run merges it, against the saved model/ read
    back with the Auto classes; every tensor nothing trained is bitwise the start checkpoint's (cast to the run's
    dtype), and no LoRA name is left."""
    from transformers import AutoModelForCausalLM

    from clakit.uptrain import pipeline, student
    from clakit.uptrain import uptrain as run_uptrain

    ids, seen, merge = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0)), {}, student.merged

    def capture(model, dtype=None):
        was = model.training
        with torch.no_grad():
            seen["logits"] = model.eval()(input_ids=ids).logits.float()
        model.train(was)
        return merge(model, dtype)

    monkeypatch.setattr(pipeline.student, "merged", capture)
    lora = {**ODD_LORA, "full_train": ODD_FULL, "lora_dropout": 0.0}
    train = {"bf16": bf16, "max_steps": 3, "save_steps": 0, "learning_rate": "2e-2"}
    recipe = tiny_recipe(corpus_dir, tmp_path / "run", model={"path": str(odd_cla_checkpoint)}, lora=lora, train=train)
    out = run_uptrain(write_recipe(tmp_path / "r.yaml", recipe), quiet=True)
    saved = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        got = saved(input_ids=ids).logits.float()
    tol = 2e-2 if bf16 else 1e-5  # bf16: the merged weight is rounded once more than the LoRA sum was
    torch.testing.assert_close(got, seen["logits"], rtol=tol, atol=tol * seen["logits"].abs().max().item())
    start, end = tensors_of(odd_cla_checkpoint), tensors_of(out)
    assert set(end) == set(start) and not any("lora" in k for k in end)
    dtype = torch.bfloat16 if bf16 else torch.float32
    trained = ("o_proj.weight", "gate_proj.weight", "down_proj.weight", "k_proj.", "v_proj.", "embed_tokens.")
    trained_q = {f"model.layers.{i}.self_attn.q_proj.{w}" for i in (1, 3) for w in ("weight", "bias")}
    for name, tensor in end.items():
        assert tensor.dtype == dtype, name
        if any(part in name for part in trained) or name in trained_q:
            assert not torch.equal(tensor, start[name].to(dtype)), f"{name} did not train"
        else:
            assert torch.equal(tensor, start[name].to(dtype)), f"{name} changed though nothing trains it"
    check_card_numbers(out, recipe)


def check_card_numbers(out: Path, recipe: dict) -> None:
    """The card's and uptrain.json's "uptrained" numbers are `clakit eval` of the saved folder itself."""
    from clakit.eval import evaluate

    data, batch = recipe["data"], recipe["train"].get("per_device_eval_batch_size", 4)
    measured = evaluate(str(out), data=data["eval"], seq_len=data["seq_len"], max_tokens=data["eval_max_tokens"],
                        batch_size=batch, speed=False, quiet=True)  # fmt: skip
    recorded = json.loads((out / "uptrain.json").read_text())["heldout"]["uptrained"]
    assert recorded["perplexity"] == pytest.approx(measured["perplexity"], rel=1e-6)
    assert (
        f"| uptrained | {measured['nll_per_token']:.4f} | {measured['perplexity']:.2f} |"
        in (out / "README.md").read_text()
    )


# --- resume ---------------------------------------------------------------------------------------------------------


def train_lines(run: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in x.items() if k not in ("tokens_per_s", "elapsed_s")} for x in lines if "loss" in x]


@pytest.mark.parametrize("logging_steps", [1, 3])
def test_a_killed_run_with_accumulation_copies_and_distillation_resumes_to_the_same_curve_and_weights(
    odd_source, odd_cla_checkpoint, corpus_dir, tmp_path, logging_steps
):
    """Accumulated micro-batches, windows with copies, dropout, the teacher's KL and hidden-state MSE: killed after
    step 3 (last checkpoint step 2), resumed, the loss curve and the weights equal an uninterrupted run's. Logging
    every 3 steps, the resumed run's step-3 line averaged step 3 alone (steps 1-2 were lost with the kill); the
    checkpoint now keeps them."""
    from clakit.uptrain import uptrain as run_uptrain

    sections = {
        "model": {"path": str(odd_cla_checkpoint), "original": str(odd_source)},
        "data": {"copy_fraction": 0.5, "copy_span": 8},
        "train": {"gradient_accumulation_steps": 2, "max_steps": 5, "save_steps": 2, "logging_steps": logging_steps},
        "lora": {**ODD_LORA, "full_train": ["k_proj"], "lora_dropout": 0.2},
        "distill": {"weight": 0.6, "temperature": 2.0, "hidden_mse_weight": 0.3},
    }
    runs = {
        name: write_recipe(tmp_path / f"{name}.yaml", tiny_recipe(corpus_dir, tmp_path / name, **sections))
        for name in ("full", "killed")
    }
    run_uptrain(runs["full"], quiet=True)
    killed_at_step(3, runs["killed"])
    run_uptrain(runs["killed"], resume=True, quiet=True)
    full, killed = train_lines(tmp_path / "full"), train_lines(tmp_path / "killed")
    assert [x["step"] for x in full] == [1, 2, 3, 4, 5][logging_steps - 1 :: logging_steps] + [5] * (logging_steps > 1)
    assert {"kl", "hidden_mse"} <= set(full[0])
    assert killed == full
    a, b = tensors_of(tmp_path / "full" / "model"), tensors_of(tmp_path / "killed" / "model")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# --- what trains ---------------------------------------------------------------------------------------------------


def test_peft_all_linear_shorthand_adapts_every_linear_module_but_the_output_layer():
    """lora.target_modules uses peft's LoraConfig names, and peft users write `all-linear` (every linear layer but
    lm_head): it was refused as a pattern matching no module. Now the same trainable tensors as naming all seven
    projections, on a tied model too (whose lm_head takes no adapter)."""
    from clakit.convert.inmemory import cla_model_from
    from clakit.convert.layout import uniform_layout
    from clakit.uptrain.recipe import LoraSection
    from clakit.uptrain.student import check_patterns, make_trainable, trainable_names

    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for tied in (False, True):
        models = [cla_model_from(tiny_model("llama", tie_word_embeddings=tied), uniform_layout(4, 2)) for _ in "ab"]
        shorthand = LoraSection(r=2, target_modules=["all-linear"], full_train=["consumers.q_proj"])
        check_patterns(models[0].config, shorthand)
        got = trainable_names(make_trainable(models[0], shorthand))
        want = trainable_names(
            make_trainable(models[1], LoraSection(r=2, target_modules=every, full_train=["consumers.q_proj"]))
        )
        assert got == want and not any("lm_head" in n for n in got)


# --- the loss -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_token_kl_and_its_gradient_equal_torch_kl_div(temperature):
    """The chunked KL (rows split over several chunks here: a 4,099-word vocabulary) against F.kl_div at T, x T^2,
    value and gradient, for a student of non-contiguous logits (a slice, as a caller may pass)."""
    import torch.nn.functional as F

    from clakit import losses

    g = torch.Generator().manual_seed(1)
    base = (torch.randn(3, 1200, 4099, generator=g) * 3).requires_grad_(True)
    student, teacher = base[:, 1:], torch.randn(3, 1199, 4099, generator=g) * 3
    assert 3 * 1199 * 4099 > 2 * losses.CHUNK_ELEMENTS  # several chunks
    (0.7 * losses.token_kl(student, teacher, temperature)).backward()
    ours, base.grad = base.grad, None
    log_s, log_t = (F.log_softmax(x / temperature, -1).flatten(0, 1) for x in (student, teacher))
    reference = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * temperature**2
    (0.7 * reference).backward()
    torch.testing.assert_close(losses.token_kl(student, teacher, temperature), reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, base.grad, rtol=1e-4, atol=1e-9)


def test_the_uptrain_loss_equals_its_definition_computed_independently(odd_source, odd_cla_checkpoint):
    """weight x KL(teacher || student) at T x T^2 + (1 - weight) x next-token CE + hidden_mse_weight x the mean
    over layers and sequences of |h_s - h_t|^2 / |h_t|^2, on every position of the window, value and gradient."""
    import torch.nn.functional as F

    from clakit.sources import load_model, resolve_source
    from clakit.uptrain.distill import uptrain_loss
    from clakit.uptrain.recipe import DistillSection

    student, teacher = (load_model(resolve_source(str(p))) for p in (odd_cla_checkpoint, odd_source))
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(2))
    distill = DistillSection(weight=0.6, temperature=2.0, hidden_mse_weight=0.3)
    loss, parts = uptrain_loss(student, teacher, ids, distill)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    s, t = student(input_ids=ids, output_hidden_states=True), teacher(input_ids=ids, output_hidden_states=True)
    ce = F.cross_entropy(s.logits[:, :-1].reshape(-1, 320), ids[:, 1:].reshape(-1))
    log_s, log_t = F.log_softmax(s.logits / 2.0, -1), F.log_softmax(t.logits.detach() / 2.0, -1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean() * 4.0
    layers = zip(s.hidden_states[1:], t.hidden_states[1:], strict=True)
    # per sequence (dims 1, 2), then the mean over layers and sequences
    mse = torch.stack([(a - b.detach()).pow(2).sum((1, 2)) / b.detach().pow(2).sum((1, 2)) for a, b in layers]).mean()
    reference = 0.6 * kl + 0.4 * ce + 0.3 * mse
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    assert parts["ce"] == pytest.approx(ce.item(), rel=1e-5) and parts["kl"] == pytest.approx(kl.item(), rel=1e-5)
    for name, p in student.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_accumulating_two_micro_batches_trains_like_one_batch_of_twice_the_size(
    odd_source, odd_cla_checkpoint, corpus_dir, tmp_path
):
    """batch 1 x 2 accumulation reads the blocks batch 2 x 1 reads, step for step, and each micro-batch's mean loss
    is halved: the same gradients, so the same weights and logged losses (to float error), distillation included."""
    from clakit.uptrain import uptrain as run_uptrain

    runs = {}
    for name, batch, accumulation in (("one", 2, 1), ("two", 1, 2)):
        train = {"per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation, "max_steps": 4}
        sections = {"model": {"path": str(odd_cla_checkpoint), "original": str(odd_source)}, "train": train}
        lora = {**ODD_LORA, "full_train": ["k_proj"], "lora_dropout": 0.0}
        # the hidden-state MSE too: a ratio of whole-batch means trained other weights (3e-3 apart) on batch 1 x 2
        distill = {"weight": 0.5, "hidden_mse_weight": 0.5}
        recipe = tiny_recipe(corpus_dir, tmp_path / name, lora=lora, distill=distill, **sections)
        runs[name] = run_uptrain(write_recipe(tmp_path / f"{name}.yaml", recipe), quiet=True)
    a, b = tensors_of(runs["one"]), tensors_of(runs["two"])
    start = tensors_of(odd_cla_checkpoint)
    assert any(not torch.equal(a[k], start[k]) for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    losses = [[x["loss"] for x in train_lines(r.parent)] for r in runs.values()]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


@pytest.mark.parametrize(
    "kind,shapes,bf16", [("mistral", {}, False), ("llama", ODD_SHAPES, True)], ids=["mistral-window", "odd-llama-bf16"]
)
def test_a_student_that_shares_nothing_starts_equal_to_its_teacher(
    tokenizer, corpus_dir, tmp_path, kind, shapes, bf16
):
    """CLA with every layer its own producer is the stock model: the first step's KL and hidden-state MSE are 0 and
    the converted model scores the original's perplexity. Mistral with a sliding window (16) shorter than the
    windows trained (64), every window ending with a copy; the odd Llama shapes in bf16."""
    from clakit.convert.inmemory import cla_model_from
    from clakit.uptrain import uptrain as run_uptrain

    source = save_checkpoint(tiny_model(kind, seed=7, **shapes), tokenizer, tmp_path / "src", "10MB")
    cla = cla_model_from(tiny_model(kind, seed=7, **shapes), list(range(4)), "mean")
    start = save_checkpoint(cla, tokenizer, tmp_path / "cla", "10MB")
    sections = {
        "model": {"path": str(start), "original": str(source)},
        "data": {"seq_len": 64, "copy_fraction": 1.0, "copy_span": 16},
        "train": {"bf16": bf16, "max_steps": 1, "warmup_steps": 0, "save_steps": 0},
        "lora": {**ODD_LORA, "full_train": ["k_proj"]},
        "distill": {"weight": 1.0, "temperature": 2.0, "hidden_mse_weight": 1.0},
    }
    out = run_uptrain(
        write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus_dir, tmp_path / "run", **sections)), quiet=True
    )
    first = train_lines(out.parent)[0]
    assert first["kl"] == 0 and first["hidden_mse"] == 0 and first["ce"] > 1
    scores = {n: json.loads((out.parent / "eval" / f"{n}.json").read_text()) for n in ("original", "converted")}
    assert scores["original"]["perplexity"] == scores["converted"]["perplexity"]


# --- the card -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lora", [{"r": 0}, {"r": 8, "target_modules": []}])
def test_the_card_of_a_run_without_adapters_names_no_lora(lora):
    """lora.r 0 (or no target) trains only lora.full_train: the card said "LoRA r=0 ... on [q_proj, ...] (merged)"."""
    from clakit.uptrain import card
    from clakit.uptrain.recipe import LoraSection, Recipe

    recipe = Recipe(lora=LoraSection(**lora, full_train=["k_proj"]))
    summary = {"recipe": recipe.to_dict(), "steps": 2, "train_tokens": 64, "train_seconds": 1.0, "processes": 1}
    summary |= {"train_data": ["t.txt"], "trainable_parameters": 10, "parameters": 100}
    line = next(x for x in card._training_lines(summary) if "trained in full" in x)
    assert line.startswith("- no LoRA; trained in full: ['k_proj']") and "q_proj" not in line


# --- shipped recipes ------------------------------------------------------------------------------------------------

SHIPPED = sorted((Path(__file__).parent.parent / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_shipped_recipe_is_named_for_its_model_and_its_modules_exist_in_that_family(path):
    """recipes/<model>/<size>_<method>.yaml; its lora patterns (producers./consumers. included) each match a linear
    module of a CLA2 model of its family, with tied embeddings where the model ties them (SmolLM2, Llama 3.2)."""
    import re

    from transformers import LlamaConfig, MistralConfig

    from clakit.convert.inmemory import cla_config
    from clakit.convert.layout import uniform_layout
    from clakit.uptrain import load_recipe
    from clakit.uptrain.student import check_patterns

    assert re.fullmatch(r"[a-z0-9_]+/\d+(\.\d+)?[mb]_[a-z0-9_]+\.yaml", f"{path.parent.name}/{path.name}")
    family = MistralConfig if path.parent.name == "mistral" else LlamaConfig
    tied = path.parent.name in ("smollm2", "llama3_2")
    config = family(**{**tiny_kwargs(), "tie_word_embeddings": tied})
    check_patterns(cla_config(config, uniform_layout(4, 2)), load_recipe(path).lora)
