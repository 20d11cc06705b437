"""A CLA checkpoint in the stock tools users take it to (transformers' generate, caches and continuous batching, its
attention functions, Trainer, peft, lm-eval), against the stock model on the all-producer layout and against the CLA
model's own no-cache forward on CLA2 and a non-adjacent layout. docs/modeling.md says what works with which."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_text, tiny_model
from datasets import Dataset
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    ContinuousBatchingConfig,
    DataCollatorWithFlattening,
    DynamicCache,
    GenerationConfig,
    Trainer,
    TrainingArguments,
)
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from clakit.convert.inmemory import cla_model_from

LAYOUTS = {"all-producers": [0, 1, 2, 3], "cla2": [0, 0, 2, 2], "non-adjacent": [0, 1, 0, 1]}


def cla(kind: str, layout: list[int]):
    return cla_model_from(tiny_model(kind, num_hidden_layers=len(layout)), layout, init="mean").eval()


def prompts() -> list[list[int]]:
    """Three prompts of 7, 12 and 30 tokens (30: past the tiny Mistral's sliding window of 16)."""
    return [torch.randint(1, 300, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (7, 12, 30)]


def batch_generate(model, persistent: bool = False) -> list[list[int]]:
    """transformers' continuous batching (paged cache), greedy; the tokens of each prompt, in order."""
    config = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=-1, pad_token_id=0)
    batching = ContinuousBatchingConfig(num_blocks=16, max_batch_tokens=64)
    with torch.no_grad():
        out = model.generate_batch(
            prompts(), config, batching, warmup=False, persistent_manager=persistent, progress_bar=False
        )
    return [o.generated_tokens for o in sorted(out.values(), key=lambda o: int(o.request_id.rsplit("_", 1)[-1]))]


def no_cache_tokens(model) -> list[list[int]]:
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None, use_cache=False)
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), **kwargs)[0, len(p) :].tolist() for p in prompts()]


def paged_cache_bytes(model) -> int:
    """Bytes of the paged cache continuous batching allocated (a persistent manager keeps it), manager then freed."""
    batch_generate(model, persistent=True)
    manager = model._cached_continuous_batching_manager
    try:
        return manager.batch_processor.cache.cache_tensor.numel() * manager.batch_processor.cache.cache_tensor.itemsize
    finally:
        model.destroy_cached_continuous_batching_manager()


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_continuous_batching_pages_producers_only_and_generates_the_no_cache_tokens(kind):
    """generate_batch sized its paged cache from every layer (a page per layer per block, consumers' never
    written): a CLA2 paged cache of the same 16 blocks was the stock model's size, the KV saving lost. It now holds
    the producers' pages only; the tokens are the model's own no-cache greedy ones."""
    models = {name: cla(kind, layout) for name, layout in LAYOUTS.items()}
    for model in models.values():
        assert batch_generate(model) == no_cache_tokens(model)
    stock_bytes = paged_cache_bytes(models["all-producers"])
    for name, layout in LAYOUTS.items():
        producers = len(set(layout))
        assert paged_cache_bytes(models[name]) * len(layout) == stock_bytes * producers, name


def varlen_attention(module, query, key, value, attention_mask, cu_seq_lens_q, cu_seq_lens_k, scaling, **kwargs):
    """Flash-style variable-length attention on CPU, as continuous batching calls flash: the batch's sequences packed
    along the length (batch 1), their bounds in cu_seq_lens_q/_k, each query seeing its own sequence's keys up to
    its position (bottom-right causal); no mask. Returns (1, queries, heads, head_dim), as flash does."""
    repeat = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
    out = []
    for b in range(len(cu_seq_lens_q) - 1):
        q = query[:, :, cu_seq_lens_q[b] : cu_seq_lens_q[b + 1]]
        k, v = (t[:, :, cu_seq_lens_k[b] : cu_seq_lens_k[b + 1]] for t in (key, value))
        allowed = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(k.shape[2] - q.shape[2])
        out.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling))
    return torch.cat(out, 2).transpose(1, 2), None


@pytest.mark.parametrize("layout", ["cla2", "non-adjacent"])
def test_consumers_attend_with_their_producers_paged_kwargs_under_flash_style_attention(layout):
    """PagedAttentionCache.update picks, in the attention kwargs, the producer's group's key bounds (`cu_seq_lens_k`,
    `max_length_k`: dicts by layer type until then) and, for flash's block-table decode, its pages. A consumer calls
    no update: under flash attention (continuous batching's choice on a GPU in half precision) it got the dicts and
    every request failed (KeyError: 0, logged; generate_batch returned them empty). Here a CPU attention that reads
    the bounds as flash does (registered under a name with "flash", so continuous batching treats it as flash):
    the consumers now attend with their producer's bounds and give the no-cache greedy tokens."""
    AttentionInterface.register("flash_varlen_cpu", varlen_attention)
    AttentionMaskInterface.register("flash_varlen_cpu", flash_attention_mask)
    model = cla("llama", LAYOUTS[layout])
    want = no_cache_tokens(model)
    model.config._attn_implementation = "flash_varlen_cpu"  # set_attn_implementation would look for a flash kernel
    assert batch_generate(model) == want


REMOTE_BATCH = """
import json, sys
from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
config = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=-1, pad_token_id=0)
model.generate_batch(json.loads(sys.argv[2]), config, ContinuousBatchingConfig(num_blocks=16, max_batch_tokens=64),
                     warmup=False, persistent_manager=True, progress_bar=False)
cache = model._cached_continuous_batching_manager.batch_processor.cache.cache_tensor
print(json.dumps({"cls": type(model).__module__, "bytes": cache.numel() * cache.itemsize}))
"""


def test_remote_code_continuous_batching_pages_producers_only(tmp_path):
    """A CLA checkpoint loaded with trust_remote_code and no clakit (its copied modeling_cla.py patches the paged
    cache's layer groups as clakit's does) pages its producers only: CLA2 half the all-producer layout's bytes."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    sizes = {}
    for name in ("all-producers", "cla2"):
        folder = tmp_path / name
        cla("llama", LAYOUTS[name]).save_pretrained(folder)
        script = "import sys; sys.modules['clakit'] = None\n" + REMOTE_BATCH
        out = subprocess.run([sys.executable, "-c", script, str(folder), json.dumps(prompts())], capture_output=True,
                             text=True, env=env, cwd=tmp_path, check=True)  # fmt: skip
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["cls"].startswith("transformers_modules"), result  # the remote code, not clakit's
        sizes[name] = result["bytes"]
    assert sizes["cla2"] * 2 == sizes["all-producers"]


@pytest.mark.parametrize(  # flex_attention compiles (~15 s on CPU): Mistral's only, the one with a window
    ("kind", "attn"), [("llama", "sdpa"), ("llama", "eager"), ("mistral", "sdpa"), ("mistral", "flex_attention")]
)
def test_flattened_packed_sequences_attend_within_their_own_sequence(kind, attn):
    """HF's DataCollatorWithFlattening (one row, position_ids restarting per sequence, no attention mask): with no
    cache transformers builds a block-diagonal mask from the position ids; consumers get the same mask as their
    producers, so each packed sequence's logits are its logits alone."""
    model = cla_model_from(tiny_model(kind, num_hidden_layers=4, attn_implementation=attn), [0, 1, 0, 1]).eval()
    first, second = prompts()[1], prompts()[2]  # 12 and 30 tokens
    batch = DataCollatorWithFlattening(return_position_ids=True)([{"input_ids": first}, {"input_ids": second}])
    with torch.no_grad():
        packed = model(batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        alone = [model(torch.tensor([ids])).logits for ids in (first, second)]
    torch.testing.assert_close(packed, torch.cat(alone, 1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["cla2", "non-adjacent"])
def test_a_deep_copied_prompt_cache_continues_two_suffixes_like_no_cache(layout):
    """Prefix reuse: the prompt's DynamicCache computed once, deep-copied, and each copy continued with another
    suffix through generate gives the no-cache tokens (consumers hold nothing to copy; producers' K/V are cloned)."""
    model = cla("mistral", LAYOUTS[layout])
    prefix = torch.tensor([prompts()[2]])  # 30 tokens, past the window of 16
    cache = DynamicCache(config=model.config)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model(prefix, cache=cache, use_cache=True)
        for suffix in ([11, 12, 13], [40, 41]):
            full = torch.cat([prefix, torch.tensor([suffix])], 1)
            reused = model.generate(full, cache=copy.deepcopy(cache), **kwargs)
            assert torch.equal(reused, model.generate(full, use_cache=False, **kwargs))
    assert cache.get_seq_length() == prefix.shape[1]  # the copies' continuations left the original as it was


def train_one_step(model, folder: Path) -> int:
    """HF Trainer, one step on CPU; how many trainable tensors it changed."""
    ids = torch.tensor(prompts()[2][:24]).repeat(4, 1).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(str(folder), max_steps=1, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True)  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    Trainer(model=model, args=args, train_dataset=data).train()
    return sum(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)


def test_trainer_with_peft_lora_saves_an_adapter_that_reloads_and_merges(tmp_path):
    """A CLA model trained outside clakit: peft LoRA on every attention projection (consumers have no k/v_proj, so
    only producers get those adapters), one HF Trainer step, the adapter reloaded onto the saved base with
    PeftModel.from_pretrained, then merge_and_unload, saved and reloaded through the Auto class: the same logits."""
    from peft import LoraConfig, PeftModel, get_peft_model

    layout = LAYOUTS["non-adjacent"]
    cla("llama", layout).save_pretrained(tmp_path / "base")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)  # B != 0: A moves too
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), lora)
    assert train_one_step(model, tmp_path / "run") == 2 * (2 * len(layout) + 2 * len(set(layout)))  # A and B
    model.eval().save_pretrained(tmp_path / "adapter")
    x = torch.tensor([prompts()[1]])
    with torch.no_grad():
        want = model(x).logits
        reloaded = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
        )
        torch.testing.assert_close(reloaded.eval()(x).logits, want, rtol=0, atol=0)
        reloaded.merge_and_unload().save_pretrained(tmp_path / "merged")
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        assert type(merged).__name__ == "LlamaCLAForCausalLM"
        torch.testing.assert_close(merged(x).logits, want, rtol=1e-4, atol=1e-5)


def test_lm_evals_own_hf_model_loads_the_cla_checkpoint_and_scores_as_clakits_bridge(tmp_path, tokenizer):
    """lm_eval.simple_evaluate(model="hf", model_args="pretrained=DIR") with clakit imported loads the CLA class (not
    a stock Llama re-initialising consumers' K/V) and gives clakit's bridge's scores, a loglikelihood task and a
    rolling one (local task YAMLs, no Hub)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from clakit.eval import harness

    model = cla("llama", LAYOUTS["non-adjacent"])
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    specs = lm_eval_tasks(tmp_path)
    bridge = harness.run_tasks(model, tokenizer, harness.prepare([str(tmp_path / f"{s}.yaml") for s in specs]), 4)
    results = simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'ckpt'}", tasks=specs, device="cpu",
                              task_manager=TaskManager(include_path=str(tmp_path)), batch_size=4)  # fmt: skip
    assert harness.scores(results) == bridge["tasks"]
    assert results["config"]["model_args"] == f"pretrained={tmp_path / 'ckpt'}"


def lm_eval_tasks(folder: Path) -> list[str]:
    """tiny_mc (8 questions, 4 choices: loglikelihood) and tiny_roll (one document: rolling loglikelihood)."""
    prompts_ = [" ".join(s.split()[:5]) for s in make_text(400, 31).split(". ")[:8]]
    rows = [{"question": q, "choices": ["unto him", "kludge hack", "the of", "wizard mode"], "label": i % 4}
            for i, q in enumerate(prompts_)]  # fmt: skip
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "doc.jsonl").write_text(json.dumps({"text": make_text(300, 32)}) + "\n")
    mc = "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: choices\ndoc_to_target: label\n"
    mc += "metric_list:\n  - metric: acc\n"
    roll = "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
    roll += "metric_list:\n  - metric: word_perplexity\n"
    for name, data, body in [("tiny_mc", "rows", mc), ("tiny_roll", "doc", roll)]:
        head = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / data}.jsonl\n"
        (folder / f"{name}.yaml").write_text(head + f"test_split: test\n{body}")
    return ["tiny_mc", "tiny_roll"]


def test_the_sharing_dict_keeps_the_mapping_constructor_kvsharingdict_has():
    """CLASharingDict (74f585c) took no arguments, so UserDict operations that rebuild by type (`|`, or a helper
    calling type(d)(items), as mapping-walking device movers can) raised TypeError where KVSharingDict works."""
    from clakit.modeling.modeling_cla import CLASharingDict

    kv = (torch.zeros(1, 2, 3, 4), torch.ones(1, 2, 3, 4))
    merged = CLASharingDict() | {"0": kv}
    assert isinstance(merged, CLASharingDict) and merged["0"] is kv and merged.cache_kwargs == {}
    assert type(merged)(merged)["0"] is kv


def test_torch_export_decodes_the_no_cache_tokens_with_a_cache_of_producers_only():
    """transformers' executorch recipe (TorchExportableModuleForDecoderOnlyLM: a StaticCache of buffers, then
    torch.export): the exported program, fed one token at a time, gives the no-cache greedy tokens, and its cache
    buffers hold the producers' K/V only (half the all-producer layout's at [0, 1, 0, 1])."""
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    def recipe(model):
        model.generation_config = GenerationConfig(use_cache=True, cache_implementation="static", max_length=64,
                                                   cache_config={"batch_size": 1, "max_cache_len": 64})  # fmt: skip
        return TorchExportableModuleForDecoderOnlyLM(model)

    def cache_numel(module) -> int:
        return sum(b.numel() for n, b in module.named_buffers() if "cache" in n)

    model, prompt = cla("llama", LAYOUTS["non-adjacent"]), prompts()[1]
    want = no_cache_tokens(model)[1]
    exported = recipe(model)
    assert cache_numel(exported) * 2 == cache_numel(recipe(cla("llama", LAYOUTS["all-producers"])))
    with torch.no_grad():
        step = exported.export(input_ids=torch.tensor([[1]]), cache_position=torch.tensor([0])).module()
        for position, token in enumerate(prompt + want[:-1]):
            logits = step(input_ids=torch.tensor([[token]]), cache_position=torch.tensor([position]))
            if position >= len(prompt) - 1:
                assert int(logits[0, -1].argmax()) == want[position - len(prompt) + 1]


@pytest.mark.parametrize("layout", ["cla2", "non-adjacent"])
def test_a_cropped_cache_continues_like_the_full_forward(layout):
    """cache.crop(-n) (transformers 5.25 takes the tokens to remove as a negative count) drops the producers' last n
    positions; re-feeding them gives the full forward's logits (consumers hold nothing to crop)."""
    model = cla("llama", LAYOUTS[layout])
    x = torch.tensor([prompts()[2]])
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(x[:, :24], cache=cache, use_cache=True)
        cache.crop(-6)
        assert cache.get_seq_length() == 18
        again = model(x[:, 18:24], cache=cache, use_cache=True).logits
        torch.testing.assert_close(again, model(x[:, :24]).logits[:, 18:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "moved",
    [
        "import transformers.generation.continuous_batching as m; del m.PagedAttentionCache",  # ImportError
        "import transformers.generation.continuous_batching.cache as m; del m.group_layers_by_attn_type",
    ],
    ids=["class-moved", "function-moved"],
)
def test_clakit_imports_and_runs_where_a_later_transformers_moved_continuous_batching(moved):
    """The paged-cache fix patches transformers' continuous batching internals (5.24-5.25); clakit allows any later
    5.x. Where they have moved, `import clakit` must still work and the CLA model still generate (before: the
    module-level import made `import clakit` itself fail, ImportError / AttributeError)."""
    script = (
        f"{moved}\n"
        "import torch, clakit\n"
        "from conftest import tiny_model\n"
        "from clakit.convert.inmemory import cla_model_from\n"
        "model = cla_model_from(tiny_model('llama', num_hidden_layers=4), [0, 0, 2, 2], init='mean').eval()\n"
        "ids = torch.tensor([[5, 6, 7, 8]])\n"
        "with torch.no_grad():\n"
        "    full = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0)\n"
        "    cached = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)\n"
        "print(full.tolist() == cached.tolist())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True"
