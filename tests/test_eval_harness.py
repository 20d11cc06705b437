"""The lm-evaluation-harness bridge, really run: local task YAMLs (multiple choice, greedy generation, rolling
loglikelihood over local JSON files, so no Hub) on tiny stock and CLA models, through the library and the CLI."""

import json

import pytest
from conftest import make_text, tiny_model

from clakit.cli import main
from clakit.convert.inmemory import cla_model_from
from clakit.convert.layout import uniform_layout
from clakit.errors import ClakitError
from clakit.eval import evaluate, harness, write_json

CHOICES = ["unto him", "kludge hack", "the of", "wizard mode"]
MAX_GEN = 5


def task_yaml(name: str, data, body: str) -> str:
    return (
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n{body}"
    )


def greedy(model, tokenizer, prompt: str) -> str:
    """What the stock model generates: the target of the generation task, so a right pipeline scores 1.0."""
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=MAX_GEN, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def stock():
    return tiny_model("llama", max_position_embeddings=128)


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory, stock, tokenizer):
    """tiny_mc.yaml (8 questions, 4 choices), tiny_gen.yaml (targets = the stock model's greedy continuation),
    tiny_roll.yaml (one document scored with lm-eval's rolling loglikelihood: word perplexity, bits per byte)."""
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    prompts = [" ".join(s.split()[:5]) for s in make_text(400, 31).split(". ")[:8]]
    rows = [{"question": q, "choices": CHOICES, "label": i % 4, "gen": greedy(stock, tokenizer, q)} for i, q in
            enumerate(prompts)]  # fmt: skip
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "doc.jsonl").write_text(json.dumps({"text": make_text(400, 32)}) + "\n")
    mc = "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: choices\ndoc_to_target: label\n"
    mc += "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    gen = "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{gen}}'\n"
    gen += f"generation_kwargs: {{until: ['<|endoftext|>'], max_gen_toks: {MAX_GEN}, do_sample: false}}\n"
    gen += "metric_list:\n  - metric: exact_match\n"
    roll = "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n"
    roll += "".join(f"  - metric: {m}\n" for m in ("word_perplexity", "byte_perplexity", "bits_per_byte"))
    for name, data, body in [("mc", "rows", mc), ("gen", "rows", gen), ("roll", "doc", roll)]:
        (d / f"tiny_{name}.yaml").write_text(task_yaml(f"tiny_{name}", d / f"{data}.jsonl", body))
    return d


@pytest.fixture(scope="module")
def tasks(tasks_dir):
    return harness.prepare([str(tasks_dir / f"tiny_{n}.yaml") for n in ("mc", "gen", "roll")])


@pytest.fixture(scope="module")
def stock_scores(stock, tokenizer, tasks):
    return harness.run_tasks(stock, tokenizer, tasks, batch_size=4)


def test_scores_have_lm_eval_structure(stock_scores, tasks_dir):
    assert set(stock_scores["tasks"]) == {"tiny_mc", "tiny_gen", "tiny_roll"}
    mc = stock_scores["tasks"]["tiny_mc"]
    assert mc["num_samples"] == 8 and mc["num_fewshot"] == 0
    for metric in ("acc", "acc_norm"):
        assert 0.0 <= mc[metric] <= 1.0 and mc[f"{metric}_stderr"] > 0
        assert mc[metric] * 8 == round(mc[metric] * 8)  # a fraction of the 8 questions
    assert stock_scores["settings"]["tasks"] == [str(tasks_dir / f"tiny_{n}.yaml") for n in ("mc", "gen", "roll")]
    assert stock_scores["version"].startswith("0.")
    json.dumps(stock_scores)  # plain JSON types only


def test_generation_reproduces_the_stock_models_greedy_output(stock_scores):
    assert stock_scores["tasks"]["tiny_gen"]["exact_match"] == 1.0


def test_factor_one_cla_model_scores_exactly_like_the_stock_model(stock, tokenizer, tasks, stock_scores):
    """Every layer a producer: the CLA classes (their cache during generation included) are the stock model."""
    cla1 = cla_model_from(stock, uniform_layout(stock.config.num_hidden_layers, 1))
    assert type(cla1).__name__ == "LlamaCLAForCausalLM"
    assert harness.run_tasks(cla1, tokenizer, tasks, batch_size=4)["tasks"] == stock_scores["tasks"]


def test_cla2_model_runs_every_task_and_differs(stock, tokenizer, tasks, stock_scores):
    cla2 = harness.run_tasks(cla_model_from(stock, uniform_layout(4, 2)), tokenizer, tasks, batch_size=2)["tasks"]
    assert 0.0 <= cla2["tiny_mc"]["acc"] <= 1.0 and 0.0 <= cla2["tiny_gen"]["exact_match"] <= 1.0
    assert cla2["tiny_roll"]["bits_per_byte"] != stock_scores["tasks"]["tiny_roll"]["bits_per_byte"]


def test_clakit_bits_per_byte_matches_lm_eval_rolling_loglikelihood(stock, tokenizer, tasks_dir, stock_scores):
    """clakit's disjoint windows of the model's context length are lm-eval's rolling windows (context_len=1)."""
    text = json.loads((tasks_dir / "doc.jsonl").read_text())["text"]
    ours = evaluate(stock, tokenizer=tokenizer, text=text, seq_len=128, speed=False, quiet=True)
    lm = stock_scores["tasks"]["tiny_roll"]
    assert ours["num_tokens"] > 3 * 128  # several windows, a partial last one
    assert ours["bits_per_byte"] == pytest.approx(lm["bits_per_byte"], rel=1e-5)
    assert ours["word_perplexity"] == pytest.approx(lm["word_perplexity"], rel=1e-4)


def test_cli_folds_scores_into_the_report_and_report_shows_them(capsys, tmp_path, tiny_llama_checkpoint, tasks_dir):
    """`clakit eval --lm-eval-tasks NAME --lm-eval-include DIR` on a checkpoint and its CLA2, then `clakit report`."""
    cla_dir = tmp_path / "cla2"
    assert main(["convert", str(tiny_llama_checkpoint), str(cla_dir), "--factor", "2", "--init", "mean"]) == 0
    data = tmp_path / "text.txt"
    data.write_text(make_text(300, 33))
    for name, model in [("orig", tiny_llama_checkpoint), ("cla2", cla_dir)]:
        argv = ["eval", model, "-o", tmp_path / f"{name}.json", "--data", data, "--seq-len", 32, "--no-speed"]
        argv += ["--quiet", "--lm-eval-tasks", "tiny_mc", "--lm-eval-include", tasks_dir, "--lm-eval-limit", 6]
        assert main([str(a) for a in argv]) == 0
    stdout = capsys.readouterr().out
    assert "lm-eval tiny_mc (6 docs): acc " in stdout
    reports = [json.loads((tmp_path / f"{n}.json").read_text()) for n in ("orig", "cla2")]
    for r in reports:
        assert r["lm_eval"]["tasks"]["tiny_mc"]["num_samples"] == 6 and r["lm_eval"]["settings"]["limit"] == 6
    assert main(["report", str(tmp_path / "orig.json"), str(tmp_path / "cla2.json"), "-o", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    acc, stderr = (reports[1]["lm_eval"]["tasks"]["tiny_mc"][k] for k in ("acc", "acc_stderr"))
    assert "| model | tiny_mc acc | tiny_mc acc_norm |" in md and f"| cla2 | {acc:.4f} ± {stderr:.4f} |" in md
    assert "<h2>lm-eval tasks</h2>" in (tmp_path / "rep" / "report.html").read_text()

    other = {**reports[1], "lm_eval": {**reports[1]["lm_eval"], "settings": {"limit": None, "num_fewshot": None}}}
    write_json(other, tmp_path / "other.json")
    assert main(["report", str(tmp_path / "orig.json"), str(tmp_path / "other.json"), "-o", str(tmp_path / "r2")]) == 2
    assert "lm_eval.settings.limit differs" in capsys.readouterr().err and not (tmp_path / "r2").exists()


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"lm_eval_tasks": "missing/task.yaml"}, "lm-eval task file missing/task.yaml does not exist"),
        ({"lm_eval_tasks": "no_such_task_xyz"}, "unknown lm-eval task"),
        ({"lm_eval_tasks": "{nodata}"}, "lm-eval could not load"),  # its data file is missing
        ({"lm_eval_tasks": "{mc}", "lm_eval_limit": 0}, "--lm-eval-limit must be a positive integer"),
        ({"lm_eval_tasks": "{mc}", "lm_eval_include": "{mc}"}, "is not a folder"),
        ({"lm_eval_include": "{dir}"}, "need --lm-eval-tasks"),
    ],
)
def test_bad_lm_eval_settings_fail_before_the_model_is_loaded(
    stock, tokenizer, tasks_dir, monkeypatch, kwargs, needle
):
    monkeypatch.setattr("clakit.eval.suite._load", lambda *a: pytest.fail("the model was loaded"))
    nodata = tasks_dir / "nodata" / "tiny_nodata.yaml"
    nodata.parent.mkdir(exist_ok=True)
    nodata.write_text(task_yaml("tiny_nodata", tasks_dir / "missing.jsonl", "output_type: loglikelihood_rolling\n"))
    fill = {"mc": str(tasks_dir / "tiny_mc.yaml"), "dir": str(tasks_dir), "nodata": str(nodata)}
    kwargs = {k: v.format(**fill) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(ClakitError) as e:
        evaluate(stock, tokenizer=tokenizer, text=make_text(200, 1), seq_len=16, quiet=True, **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_tokenizer_with_neither_bos_nor_eos_is_refused_for_lm_eval_before_the_model_is_loaded(
    stock, tokenizer, tasks_dir, monkeypatch
):
    """lm-eval prefixes every request with BOS (else EOS) and decodes it: with neither, every task failed with
    "'None' is not an instance of 'Sequence'", after perplexity, KV, speed and passkeys had all run."""
    import copy

    bare = copy.deepcopy(tokenizer)
    bare.bos_token, bare.eos_token = None, None
    monkeypatch.setattr("clakit.eval.suite._load", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(ClakitError, match="needs a tokenizer with a BOS or EOS token"):
        evaluate(stock, tokenizer=bare, text=make_text(200, 1), seq_len=16, quiet=True,
                 lm_eval_tasks=str(tasks_dir / "tiny_roll.yaml"))  # fmt: skip


def test_a_tokenizer_that_adds_bos_is_scored_with_one_bos_by_lm_eval_too(stock, tokenizer, tasks_dir):
    """Llama's and Mistral's tokenizers add BOS themselves; lm-eval 0.4.13 encoded the rolling text with it and put
    its own prefix BOS before it: [BOS, BOS, text] was scored (BOS a target), and its bits per byte disagreed with
    clakit's in the same report (helper J: 3.2e-3 on a Llama-2-style tokenizer). The same tokenizer, adding BOS."""
    from conftest import build_tokenizer
    from tokenizers.processors import TemplateProcessing

    adds_bos = build_tokenizer()
    bos = (adds_bos.bos_token, adds_bos.bos_token_id)
    adds_bos.backend_tokenizer.post_processor = TemplateProcessing(single=f"{bos[0]} $A", special_tokens=[bos])
    assert adds_bos("a b")["input_ids"][0] == bos[1] != tokenizer("a b")["input_ids"][0]
    text = json.loads((tasks_dir / "doc.jsonl").read_text())["text"]
    roll = str(tasks_dir / "tiny_roll.yaml")
    r = evaluate(stock, tokenizer=adds_bos, text=text, seq_len=40, speed=False, quiet=True, lm_eval_tasks=roll)
    lm = r["lm_eval"]["tasks"]["tiny_roll"]
    assert r["bits_per_byte"] == pytest.approx(lm["bits_per_byte"], rel=1e-5)
    assert r["word_perplexity"] == pytest.approx(lm["word_perplexity"], rel=1e-4)


def test_report_runs_lm_eval_on_clakits_windows(stock, tokenizer, tasks_dir):
    """`--seq-len` shorter than the model's context: lm-eval gets max_length = seq_len, so its rolling word perplexity
    and bits per byte equal clakit's in the same report (not lm-eval's one window of the whole context)."""
    text = json.loads((tasks_dir / "doc.jsonl").read_text())["text"]
    roll = str(tasks_dir / "tiny_roll.yaml")
    r = evaluate(stock, tokenizer=tokenizer, text=text, seq_len=40, speed=False, quiet=True, lm_eval_tasks=roll)
    lm = r["lm_eval"]["tasks"]["tiny_roll"]
    assert r["lm_eval"]["settings"]["max_length"] == 40 and r["num_windows"] > 8
    assert r["bits_per_byte"] == pytest.approx(lm["bits_per_byte"], rel=1e-5)
    assert r["word_perplexity"] == pytest.approx(lm["word_perplexity"], rel=1e-4)
    whole = harness.run_tasks(stock, tokenizer, roll, batch_size=4)["tasks"]["tiny_roll"]  # the model's context
    assert abs(whole["bits_per_byte"] / lm["bits_per_byte"] - 1) > 1e-3  # other windows: another number


def test_an_answer_longer_than_the_window_is_named_with_the_fix(stock, tokenizer, tasks_dir):
    """lm-eval asserts each answer choice fits the window it runs in (max_length = --seq-len), with no message: the
    line said only "AssertionError"."""
    with pytest.raises(ClakitError, match=r"an answer longer than the window it runs in, 1 tokens: --seq-len\); rai"):
        harness.run_tasks(stock, tokenizer, str(tasks_dir / "tiny_mc.yaml"), batch_size=4, max_length=1)
