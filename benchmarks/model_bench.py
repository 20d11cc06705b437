"""CLA2 vs the original on a SmolLM2-135M-shaped config (random weights): cache bytes, decode and training speed.

Prints JSON, with the targets of targets.json ("model_bench": cache ratio exactly 0.5; CLA2 decode >= 0.95x the
original's tokens/s: it computes fewer projections, so it should not be slower). Timings alternate the two models in
one run and take medians, since the machine is shared and noisy.

    python benchmarks/model_bench.py [--layers 30] [--prompt 128] [--new-tokens 32] [--repeats 3]
"""

import argparse
import json
import statistics
import time

import torch
from targets import check
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from clakit.convert.inmemory import cla_model_from
from clakit.convert.layout import uniform_layout
from clakit.eval.kvcache import cache_bytes

SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)


def cache_bytes_per_token(model, prompt: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, prompt))
    with torch.inference_mode():
        cache = model(ids, use_cache=True).cache
    return cache_bytes(cache) / prompt


def decode_tokens_per_s(model, batch: int, prompt: int, new_tokens: int) -> float:
    """Greedy decode loop with a DynamicCache; times only the new tokens (after the prefill)."""
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt))
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        logits = model(ids, cache=cache, use_cache=True).logits[:, -1:]
        start = time.perf_counter()
        for _ in range(new_tokens):
            logits = model(logits.argmax(-1), cache=cache, use_cache=True).logits
        return batch * new_tokens / (time.perf_counter() - start)


def train_tokens_per_s(model, batch: int, seq: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    model.train()
    start = time.perf_counter()
    model(ids, labels=ids).loss.backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    model.eval()
    return batch * seq / elapsed


def median_pair(fn, models, repeats: int) -> list[float]:
    """Alternate the models `repeats` times so drift in machine load hits both alike."""
    runs = [[], []]
    for _ in range(repeats):
        for i, model in enumerate(models):
            runs[i].append(fn(model))
    return [statistics.median(r) for r in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--train-seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    original = LlamaForCausalLM(LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": args.layers})).eval()
    cla2 = cla_model_from(original, uniform_layout(args.layers, 2), init="mean")
    models = [original, cla2]
    result = {"config": {**SMOLLM2_135M, "num_hidden_layers": args.layers}, "threads": torch.get_num_threads()}
    bytes_orig, bytes_cla = (cache_bytes_per_token(m, args.prompt) for m in models)
    result["cache_bytes_per_token"] = {"original": bytes_orig, "cla2": bytes_cla, "ratio": bytes_cla / bytes_orig}
    for batch in (1, 8):
        orig, cla = median_pair(
            lambda m, b=batch: decode_tokens_per_s(m, b, args.prompt, args.new_tokens), models, args.repeats
        )
        result[f"decode_tokens_per_s_batch{batch}"] = {"original": orig, "cla2": cla, "ratio": cla / orig}
    orig, cla = median_pair(lambda m: train_tokens_per_s(m, 2, args.train_seq), models, args.repeats)
    result["train_fwd_bwd_tokens_per_s"] = {"original": orig, "cla2": cla, "ratio": cla / orig}
    measured = {
        "cache_ratio": result["cache_bytes_per_token"]["ratio"],
        "decode_ratio_batch1": result["decode_tokens_per_s_batch1"]["ratio"],
        "decode_ratio_batch8": result["decode_tokens_per_s_batch8"]["ratio"],
    }
    result["targets"] = check("model_bench", measured)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
