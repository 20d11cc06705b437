"""Run a checkpoint in vLLM offline and print one JSON object: KV capacity, greedy tokens, throughput.

    python -m clakit_vllm.run MODEL --prompts-json prompts.json [--max-tokens 16] [--repeat N] [--dtype float32]
        [--kv-cache-dtype fp8]

prompts.json holds a list of token-id lists (the caller tokenizes, so every engine sees the same ids). Each prompt
is submitted `--repeat` times at once (greedy); the output has vLLM's KV capacity in tokens and its maximum
concurrency at max_model_len (as vLLM logs them), the tokens of the first copy of each prompt, and the wall time and
generated tokens/s of the whole batch. The KV cache size is --kv-cache-bytes, else (on CPU) VLLM_CPU_KVCACHE_SPACE GiB.

Bad input (a folder that is not a checkpoint, a layout or weights the plugin cannot serve, prompts that are not
token ids of the model, a count below 1) is refused before vLLM starts: one line naming it and the fix, exit 2.
"""

import argparse
import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import get_args

from . import CLA_MODEL_TYPES

PROG = "python -m clakit_vllm.run"
STOCK_MODEL_TYPES = ("llama", "mistral")  # the families clakit converts: their weights are checked too
DTYPES = ("auto", "float32", "float16", "bfloat16", "float", "half")
FIX_PROMPTS = "give a JSON list of token-id lists made with the model's tokenizer, e.g. [[1, 2, 3], [4, 5]]"


class InputError(Exception):
    """Bad input, found before vLLM starts: printed as one line, exit 2."""


class Parser(argparse.ArgumentParser):
    """argparse with a usage error as one line (exit 2, as argparse) and no abbreviated flags."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{PROG}: error: {message}; see `{PROG} --help`\n")


def positive_int(text: str) -> int:
    """A count or size: 0 used to be taken as "not given" (vLLM's default) and a negative one reached vLLM."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="checkpoint folder")
    p.add_argument("--prompts-json", required=True, help="file with a JSON list of token-id lists")
    p.add_argument("--max-tokens", type=positive_int, default=16)
    p.add_argument("--repeat", type=positive_int, default=1, help="submit each prompt this many times at once")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--kv-cache-dtype", default="auto", help="vLLM's cache dtype: auto (the model's), fp8, ...")
    p.add_argument("--max-model-len", type=positive_int, default=None)
    p.add_argument(
        "--kv-cache-bytes",
        type=positive_int,
        default=None,
        help="KV cache size (default: vLLM's; on CPU from VLLM_CPU_KVCACHE_SPACE)",
    )
    p.add_argument("--max-num-seqs", type=positive_int, default=None, help="vLLM's batch limit (default: vLLM's)")
    p.add_argument("--compile", action="store_true", help="let vLLM compile the model (default: eager)")
    return p.parse_args(argv)


def read_json(path: Path, what: str, fix: str):
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise InputError(f"cannot read {what} {path}: {e.strerror or e}; {fix}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise InputError(f"{what} {path} is not JSON ({e}); {fix}") from None


def read_config(folder: str) -> dict:
    """The checkpoint's config.json."""
    fix = "give the folder `clakit convert` wrote (or a stock Llama/Mistral folder)"
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise InputError(f"{folder} is not a checkpoint folder (it has no config.json); {fix}")
    config = read_json(path / "config.json", "the checkpoint's config", fix)
    if not isinstance(config, dict):
        raise InputError(f"{path / 'config.json'} holds no JSON object; {fix}")
    check_fields(config, path / "config.json")
    return config


# the config.json fields read before vLLM starts (the lengths vLLM derives its context from: CONTEXT_KEYS)
COUNT_FIELDS = ("num_hidden_layers", "vocab_size")
# vLLM's `derived_max_model_len_and_key`: the smallest of these is the context, a model_max_length replaces it
CONTEXT_KEYS = (
    "max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length", "max_target_positions",
    "max_sequence_length", "max_seq_length", "seq_len",
)  # fmt: skip


def check_fields(config: dict, path: Path) -> None:
    """The fields this check reads, of the types vLLM reads them as: a string or a float there was a traceback here
    (a TypeError comparing lengths) or in transformers' strict config class, exit 1."""
    for key in (*COUNT_FIELDS, *CONTEXT_KEYS):
        value = config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise InputError(
                f"{path} has {key} {json.dumps(value)}, not a whole number >= 1; restore the checkpoint's config.json"
            )
    for key in ("rope_scaling", "rope_parameters"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise InputError(
                f"{path} has {key} {json.dumps(config[key])[:60]}, not an object such as "
                '{"rope_type": "default"}; restore the checkpoint\'s config.json'
            )


def check_cla_checkpoint(path: Path, model_type: str) -> None:
    """The checks vLLM would make after its start-up (or not at all, for the weights): the plugin's config class
    reads config.json (layout, architecture), then the tensor names, from the safetensors headers, must fit."""
    from .configs import LlamaCLAConfig, MistralCLAConfig, missing_attention_tensors, unexpected_kv_tensor

    config_class = {"llama_cla": LlamaCLAConfig, "mistral_cla": MistralCLAConfig}[model_type]
    try:
        config = config_class.from_pretrained(path)
    except ValueError as e:  # the plugin's own one-line message (layout_problem), or transformers' on other fields
        raise InputError(" ".join(str(e).split())) from None
    except Exception as e:  # huggingface_hub's strict field errors (an Exception), a KeyError...
        raise InputError(
            f"{path / 'config.json'} is not a valid {model_type} config ({type(e).__name__}: "
            f"{' '.join(str(e).split())}); restore the config.json `clakit convert` wrote"
        ) from None
    names = tensor_names(path)
    if not names:  # no safetensors (e.g. .bin): vLLM's load checks them
        return
    layout = config.kv_source_layers
    problem = next(filter(None, (unexpected_kv_tensor(n, layout) for n in names)), None)
    problem = problem or missing_attention_tensors(names, layout, range(config.num_hidden_layers))
    if problem:
        raise InputError(f"clakit_vllm: cannot serve this CLA checkpoint: {problem}")


def check_stock_checkpoint(path: Path, config: dict) -> None:
    """A stock Llama/Mistral config over CLA weights (a CLA checkpoint's config.json edited to model_type "llama"):
    vLLM's stock class loaded it without a word and served every token 0, the consumers' K/V projections never
    loaded. Refused by the config's CLA fields, else by the weights: every layer needs q/k/v_proj."""
    from . import ARCHITECTURES

    cla = [a for a in config.get("architectures") or [] if a in ARCHITECTURES]
    if "kv_source_layers" in config or cla:
        what = "kv_source_layers" if "kv_source_layers" in config else f"architectures {cla}"
        raise InputError(
            f"{path / 'config.json'} says model_type {config['model_type']!r} but holds {what}, as a CLA "
            f"checkpoint's does (edited?); set model_type to {config['model_type']}_cla, as clakit wrote it"
        )
    names, layers = tensor_names(path), config.get("num_hidden_layers")
    problem = names and layers and stock_weights_problem(names, layers)
    if problem:
        raise InputError(f"clakit_vllm: cannot serve {path} as a stock {config['model_type']}: {problem}")


def stock_weights_problem(names: list[str], layers: int) -> str | None:
    """What a stock checkpoint's tensor names lack, with the fix; None when every layer has q/k/v_proj. Layers with
    queries and neither keys nor values are CLA consumers (a CLA checkpoint under a stock config); anything else
    missing is a damaged download."""
    from .configs import attention_projections, missing_projections

    present = attention_projections(names)
    consumers = [n for n in range(layers) if (n, "q") in present and not {(n, "k"), (n, "v")} & present]
    if consumers:
        return (
            f"layers {consumers[:4]} hold q_proj and no k_proj/v_proj, as a CLA checkpoint's consumers do: set "
            "model_type to its CLA type (llama_cla or mistral_cla) and kv_source_layers, as clakit wrote them"
        )
    missing = missing_projections(present, list(range(layers)), range(layers))  # every layer a producer
    if missing:
        return f"it has no {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; re-download the checkpoint"
    return None


def tensor_names(path: Path) -> list[str]:
    """The names of the tensors in the folder's *.safetensors files (headers read, no tensor data)."""
    from safetensors import safe_open

    names = []
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            names += list(f.keys())
    return names


def check_prompts(path: Path, config: dict, args: argparse.Namespace) -> list[list[int]]:
    """The prompts: a non-empty JSON list of non-empty token-id lists, ids in the model's vocabulary, each with
    room for --max-tokens in the context (vLLM would fail on it after its start-up, or stop short silently)."""
    prompts = read_json(path, "--prompts-json", FIX_PROMPTS)
    if not isinstance(prompts, list) or not prompts:
        raise InputError(
            f"--prompts-json {path} holds {json.dumps(prompts)[:40]}, not a non-empty list; {FIX_PROMPTS}"
        )
    vocab, context = config.get("vocab_size"), context_length(config, args)
    for i, ids in enumerate(prompts):
        if problem := prompt_problem(ids, vocab, context, args.max_tokens):
            raise InputError(f"prompt {i} of {path} {problem}")
    return prompts


def prompt_problem(ids, vocab: int | None, context: int | None, max_tokens: int) -> str | None:
    """What is wrong with one prompt and the fix, as the end of a sentence; None when nothing is."""
    if not isinstance(ids, list) or not ids:
        return f"is {json.dumps(ids)[:40]}, not a non-empty list of token ids; {FIX_PROMPTS}"
    for token in ids:
        if not isinstance(token, int) or isinstance(token, bool) or token < 0 or (vocab and token >= vocab):
            ids_range = f"0 to {vocab - 1}" if vocab else ">= 0"
            return f"has {token!r}, not a token id of this model ({ids_range}); {FIX_PROMPTS}"
    if context and len(ids) + max_tokens > context:
        return (
            f"has {len(ids)} tokens, and {len(ids)} + --max-tokens {max_tokens} exceeds the context of {context} "
            "tokens; shorten the prompt or lower --max-tokens"
        )
    return None


def context_length(config: dict, args: argparse.Namespace) -> int | None:
    """--max-model-len, else the model's context (model_context); None when unknown."""
    return args.max_model_len or model_context(config)


# RoPE types whose max_position_embeddings vLLM takes as it is; the others' it multiplies by their `factor`
UNSCALED_ROPE = ("default", "su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")


def model_context(config: dict) -> int | None:
    """The context vLLM derives for a Llama/Mistral (`derived_max_model_len_and_key`, `_get_and_verify_max_len`):
    the smallest of the config's CONTEXT_KEYS, a config model_max_length replacing it, times a linear/dynamic RoPE's
    factor. None when unknown (no key; a factor that is no number). Only max_position_embeddings was read: a
    seq_length 64 passed a prompt vLLM refused after its start-up. (tokenizer_config.json's model_max_length caps
    only pooling models there: a fine-tune's short one, Alpaca's 512, does not limit a Llama's context.)"""
    found = [config[key] for key in CONTEXT_KEYS if config.get(key) is not None]
    if not found:
        return None
    context = config.get("model_max_length") or min(found)
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) in UNSCALED_ROPE:
        return context
    factor = rope.get("factor", 1.0)
    return int(context * factor) if isinstance(factor, int | float) and not isinstance(factor, bool) else None


def check_max_model_len(config: dict, args: argparse.Namespace) -> None:
    """vLLM refuses a --max-model-len above the model's context (a traceback after its start-up) unless the config
    has a model_max_length at least that long or VLLM_ALLOW_LONG_MAX_MODEL_LEN is set."""
    context = model_context(config)
    extra = config.get("model_max_length")  # vLLM lets a config's own model_max_length raise the limit
    longest = max(context or 0, extra or 0)
    allowed = os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "0").strip().lower() in ("1", "true")  # as vLLM reads it
    if args.max_model_len and context and args.max_model_len > longest and not allowed:
        raise InputError(
            f"--max-model-len {args.max_model_len} exceeds the model's context of {context} tokens "
            "(as vLLM derives it from config.json); lower it, or set VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 to make vLLM "
            "take it (positions past the context were never trained)"
        )


def check_kv_cache_dtype(name: str) -> None:
    try:  # vLLM's own list (a Literal); absent in other vLLM versions, where vLLM checks it
        with contextlib.redirect_stderr(io.StringIO()):  # vLLM's import notes (e.g. "Triton is installed, but...")
            from vllm.config.cache import CacheDType
    except ImportError:
        return
    if get_args(CacheDType) and name not in get_args(CacheDType):  # ("auto", "float16", "fp8", ...)
        raise InputError(f"--kv-cache-dtype {name!r} is not one of vLLM's: {', '.join(get_args(CacheDType))}")
    supported = _cpu_cache_dtypes()
    if supported and name not in supported:
        raise InputError(
            f"--kv-cache-dtype {name!r} is not one vLLM's CPU attention supports ({', '.join(supported)}): it is "
            "taken without a word there and serves wrong tokens (bfloat16 over float32 weights, measured); use auto"
        )


def _cpu_cache_dtypes() -> list[str]:
    """The cache dtypes of vLLM's CPU attention where vLLM runs on the CPU, else [] (another platform checks its
    own): vLLM accepts any of its dtypes there and does not check them against the backend's list."""
    with contextlib.suppress(ImportError, AttributeError), contextlib.redirect_stderr(io.StringIO()):
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

            return list(CPUAttentionBackend.supported_kv_cache_dtypes)
    return []


def check_inputs(args: argparse.Namespace) -> list[list[int]]:
    """Everything checkable before vLLM starts (tens of seconds to minutes), cheapest first; the prompts. A stock
    checkpoint (the baseline of a comparison) gets the same checks but the CLA ones."""
    config = read_config(args.model)
    check_max_model_len(config, args)
    prompts = check_prompts(Path(args.prompts_json), config, args)
    check_kv_cache_dtype(args.kv_cache_dtype)
    if config.get("model_type") in CLA_MODEL_TYPES:
        check_cla_checkpoint(Path(args.model), config["model_type"])
    elif config.get("model_type") in STOCK_MODEL_TYPES:
        check_stock_checkpoint(Path(args.model), config)
    check_vllm()
    return prompts


def check_vllm() -> None:
    """The plugin declares no vLLM dependency (vLLM's pins would choose torch for the environment it is installed
    into), so a Python without vLLM is reachable: one line naming both installs, not a ModuleNotFoundError."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise InputError(
            f"vLLM is not installed in this Python ({sys.executable}); install it beside the plugin: "
            '`pip install "vllm==0.32.*" ./serving/vllm` on a GPU machine, `serving/vllm/install-cpu.sh VENV` for '
            "the CPU build (docs/serving.md)"
        )


def engine_arguments(args: argparse.Namespace) -> dict:
    """The `LLM(...)` keyword arguments the flags ask for (only those given, so vLLM's defaults hold otherwise)."""
    engine_args = dict(model=args.model, dtype=args.dtype, enforce_eager=not args.compile, seed=0)
    engine_args["kv_cache_dtype"] = args.kv_cache_dtype
    if args.max_model_len:
        engine_args["max_model_len"] = args.max_model_len
    if args.kv_cache_bytes:
        engine_args["kv_cache_memory_bytes"] = args.kv_cache_bytes
        # vLLM's CPU platform lets this (legacy) variable override the engine argument; the flag must win
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    if args.max_num_seqs:
        engine_args["max_num_seqs"] = args.max_num_seqs
    return engine_args


def timed_generate(llm, prompts: list[list[int]], args: argparse.Namespace) -> tuple[list, float]:
    """Greedy outputs for each prompt `args.repeat` times, and the seconds they took after an untimed warm-up."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    batch = [TokensPrompt(prompt_token_ids=ids) for ids in prompts for _ in range(args.repeat)]
    llm.generate(batch[:1], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)  # warm-up, not timed
    start = time.perf_counter()
    outputs = llm.generate(batch, params, use_tqdm=False)
    return outputs, time.perf_counter() - start


def cache_facts(llm) -> dict:
    """What the engine made of the KV cache (its dtype, bytes, tokens, blocks): the numbers the CLA saving shows in."""
    config = llm.llm_engine.vllm_config
    cache = config.cache_config
    return {
        "architecture": config.model_config.architectures[0],
        "kv_cache_dtype": cache.cache_dtype,
        "kv_cache_bytes": cache.kv_cache_memory_bytes,
        "kv_cache_tokens": cache.kv_cache_size_tokens,
        "max_concurrency": cache.kv_cache_max_concurrency,
        "kv_cache_blocks": cache.num_gpu_blocks,
        "block_size": cache.block_size,
        "max_model_len": config.model_config.max_model_len,
    }


def run(args: argparse.Namespace, prompts: list[list[int]] | None = None) -> dict:
    from vllm import LLM

    prompts = prompts if prompts is not None else check_inputs(args)
    llm = LLM(**engine_arguments(args))
    outputs, seconds = timed_generate(llm, prompts, args)
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "model": args.model,
        **cache_facts(llm),
        # outputs hold each prompt `repeat` times in a row: its first copy stands for it
        "tokens": [list(outputs[i * args.repeat].outputs[0].token_ids) for i in range(len(prompts))],
        "requests": len(outputs),
        "generated_tokens": generated,
        "seconds": seconds,
        "tokens_per_s": generated / seconds,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        prompts = check_inputs(args)
    except InputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
    print("CLAKIT_VLLM_RESULT " + json.dumps(run(args, prompts)), flush=True)


if __name__ == "__main__":  # vLLM may start worker processes that re-import this module
    main()
