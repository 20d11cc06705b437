"""CLA2 vs the original on a SmolLM2-135M-shaped config (random weights): cache bytes, decode and training speed.

Prints JSON (and writes it to --out at the end): the settings, provenance (versions, command), the measured values and
the targets of targets.json of targets.json ("model_bench": cache ratio exactly 0.5; CLA2 decode >= 0.95x the
original's tokens/s: it computes fewer projections, so it should not be slower). Timings alternate the two models in
one run and take medians, since the machine is shared and noisy.

    python benchmarks/model_bench.py [--layers 30] [--prompt 128] [--new-tokens 32] [--repeats 3] [--out F]
    python benchmarks/model_bench.py --shape tiny --layers 2 --prompt 8 --new-tokens 2 --train-seq 8 --repeats 1
"""

import statistics
import time
from pathlib import Path

import torch
from common import FORCE_HELP, OUT_HELP, Parser, check_output, emit, main_guard, positive, provenance, refuse
from targets import check
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from clakit.convert.inmemory import cla_model_from
from clakit.convert.layout import uniform_layout
from clakit.eval.kvcache import measured_bytes

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
SHAPES = {  # --shape: SmolLM2-135M's width, or a tiny one for a smoke test in seconds
    "smollm2": SMOLLM2_135M,
    "tiny": dict(SMOLLM2_135M, vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2),
}  # fmt: skip


def cache_bytes_per_token(model, prompt: int) -> float:
    """What a DynamicCache holds after a prefill of `prompt` tokens, per token (clakit.eval.kvcache)."""
    return measured_bytes(model, torch.randint(0, model.config.vocab_size, (1, prompt))) / prompt


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
    parser = Parser(__doc__)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2", help="model width: smollm2 "
                        "(SmolLM2-135M's; default) or tiny (a smoke test in seconds)")  # fmt: skip
    parser.add_argument("--layers", type=positive, default=30, help="decoder layers, even (default 30)")
    parser.add_argument("--prompt", type=positive, default=128, help="prompt tokens before decoding (default 128)")
    parser.add_argument("--new-tokens", type=positive, default=32, help="decoded tokens timed per run (default 32)")
    parser.add_argument("--train-seq", type=positive, default=256, help="tokens per sequence of the forward+backward "
                        "timing, batch 2 (default 256)")  # fmt: skip
    parser.add_argument("--repeats", type=positive, default=3, help="runs per model, interleaved; medians (default 3)")
    parser.add_argument("--out", type=Path, help=OUT_HELP)
    parser.add_argument("--force", action="store_true", help=FORCE_HELP)
    args = parser.parse_args()
    if args.layers % 2:
        refuse(f"--layers {args.layers} is odd: CLA2 pairs layers, so pass an even number (e.g. {args.layers + 1})")
    check_output(args.out, args.force)
    torch.manual_seed(0)
    config = {**SHAPES[args.shape], "num_hidden_layers": args.layers}
    original = LlamaForCausalLM(LlamaConfig(**config)).eval()
    cla2 = cla_model_from(original, uniform_layout(args.layers, 2), init="mean")
    models = [original, cla2]
    result = {"benchmark": "model_bench", "provenance": provenance(args)}
    result |= {"config": config, "threads": torch.get_num_threads()}
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
    emit(result, args.out)


if __name__ == "__main__":
    main_guard(main)
