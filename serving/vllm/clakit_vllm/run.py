"""Run a checkpoint in vLLM offline and print one JSON object: KV capacity, greedy tokens, throughput.

    python -m clakit_vllm.run MODEL --prompts-json prompts.json [--max-tokens 16] [--repeat N] [--dtype float32]
        [--kv-cache-dtype fp8]

prompts.json holds a list of token-id lists (the caller tokenizes, so every engine sees the same ids). Each prompt
is submitted `--repeat` times at once (greedy); the output has vLLM's KV capacity in tokens and its maximum
concurrency at max_model_len (as vLLM logs them), the tokens of the first copy of each prompt, and the wall time and
generated tokens/s of the whole batch. The KV cache size is --kv-cache-bytes, else (on CPU) VLLM_CPU_KVCACHE_SPACE GiB.
"""

import argparse
import json
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m clakit_vllm.run", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="checkpoint folder")
    p.add_argument("--prompts-json", required=True, help="file with a JSON list of token-id lists")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--repeat", type=int, default=1, help="submit each prompt this many times at once")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kv-cache-dtype", default="auto", help="vLLM's cache dtype: auto (the model's), fp8, ...")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument(
        "--kv-cache-bytes",
        type=int,
        default=None,
        help="KV cache size (default: vLLM's; on CPU from VLLM_CPU_KVCACHE_SPACE)",
    )
    p.add_argument("--max-num-seqs", type=int, default=None, help="vLLM's batch limit (default: vLLM's)")
    p.add_argument("--compile", action="store_true", help="let vLLM compile the model (default: eager)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = json.loads(open(args.prompts_json).read())
    engine_args = dict(model=args.model, dtype=args.dtype, enforce_eager=not args.compile, seed=0)
    engine_args["kv_cache_dtype"] = args.kv_cache_dtype
    if args.max_model_len:
        engine_args["max_model_len"] = args.max_model_len
    if args.kv_cache_bytes:
        engine_args["kv_cache_memory_bytes"] = args.kv_cache_bytes
    if args.max_num_seqs:
        engine_args["max_num_seqs"] = args.max_num_seqs
    llm = LLM(**engine_args)
    cache = llm.llm_engine.vllm_config.cache_config
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    batch = [TokensPrompt(prompt_token_ids=ids) for ids in prompts for _ in range(args.repeat)]
    llm.generate(batch[:1], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)  # warm-up, not timed
    start = time.perf_counter()
    outputs = llm.generate(batch, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "model": args.model,
        "architecture": llm.llm_engine.vllm_config.model_config.architectures[0],
        "kv_cache_dtype": cache.cache_dtype,
        "kv_cache_tokens": cache.kv_cache_size_tokens,
        "max_concurrency": cache.kv_cache_max_concurrency,
        "kv_cache_blocks": cache.num_gpu_blocks,
        "block_size": cache.block_size,
        "max_model_len": llm.llm_engine.vllm_config.model_config.max_model_len,
        "tokens": [list(outputs[i * args.repeat].outputs[0].token_ids) for i in range(len(prompts))],
        "requests": len(batch),
        "generated_tokens": generated,
        "seconds": seconds,
        "tokens_per_s": generated / seconds,
    }


def main(argv=None) -> None:
    print("CLAKIT_VLLM_RESULT " + json.dumps(run(parse_args(argv))), flush=True)


if __name__ == "__main__":  # vLLM may start worker processes that re-import this module
    main()
