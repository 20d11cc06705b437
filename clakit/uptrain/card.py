"""The uptrained checkpoint's model card (README.md) and provenance (uptrain.json)."""

import json
from pathlib import Path

from clakit.convert.output_folder import serving_section
from clakit.provenance import provenance

PROVENANCE = "uptrain.json"


def summary(recipe, trainer, data, heldout: dict, kv_source_layers: list[int] | None = None) -> dict:
    """Everything the card shows: settings, token counts, before/after held-out numbers, the sharing layout."""
    trainable, total = trainer.counts
    return {
        "recipe": recipe.to_dict(),
        "steps": trainer.step,
        "train_tokens": trainer.step * trainer.plan.tokens_per_step,
        "train_seconds": round(trainer.elapsed, 1),
        "trainable_parameters": trainable,
        "parameters": total,
        "processes": trainer.accelerator.num_processes,
        "train_data": data.train_sources,
        "eval_data": data.eval_sources,
        "heldout": heldout,
        "kv_source_layers": kv_source_layers,
    }


def _row(name: str, r: dict | None, base: dict | None) -> str:
    if r is None:
        return f"| {name} | n/a | n/a | n/a |"
    ratio = f"{r['perplexity'] / base['perplexity']:.2f}x" if base else "n/a"
    return f"| {name} | {r['loss']:.4f} | {r['perplexity']:.2f} | {ratio} |"


def one_line(s: dict) -> str:
    h = s["heldout"]
    before, after = h["converted"]["perplexity"], h["uptrained"]["perplexity"]
    orig = f", original {h['original']['perplexity']:.2f}" if h.get("original") else ""
    return f"held-out perplexity {before:.2f} -> {after:.2f}{orig} after {s['train_tokens']} tokens"


def _training_lines(s: dict) -> list[str]:
    r = s["recipe"]
    t, lo, d, data = r["train"], r["lora"], r["distill"], r["data"]
    batch = f"{t['per_device_train_batch_size']} x {t['gradient_accumulation_steps']} accumulation"
    share = data.get("copy_fraction") or 0  # records from before data.copy_fraction have none
    copies = f"; {share:g} of them end with a {data['copy_span']}-token copy of an earlier span" if share else ""
    return [
        f"- {s['steps']} steps, {s['train_tokens']} tokens, {s['train_seconds']} s on {s['processes']} process(es)",
        f"- data: {', '.join(s['train_data'])}, windows of {data['seq_len']}{copies}",
        f"- learning_rate {t['learning_rate']}, {t['lr_scheduler_type']} schedule, warmup {t['warmup_steps']} "
        f"steps / ratio {t['warmup_ratio']}, batch {batch}, bf16 {t['bf16']}, seed {t['seed']}",
        f"- LoRA r={lo['r']} alpha={lo['lora_alpha']} dropout={lo['lora_dropout']} on {lo['target_modules']}"
        f" (merged); trained in full: {lo['full_train'] or 'nothing'}; {s['trainable_parameters']:,} of"
        f" {s['parameters']:,} parameters trained",
        f"- distillation weight {d['weight']}, temperature {d['temperature']}, "
        f"hidden-state MSE weight {d['hidden_mse_weight']}",
    ]


def markdown(s: dict) -> str:
    r, h = s["recipe"], s["heldout"]
    m = r["model"]
    names = (("original", "original (full KV)"), ("converted", "converted (before)"), ("uptrained", "uptrained"))
    rows = [_row(n, h.get(k), h.get("original")) for k, n in names]
    converted = f" (converted with {m['convert']})" if m["convert"] else ""
    start = f"Started from `{m['path'] or m['source']}`{converted}"
    data = f"{', '.join(s['eval_data'])}; {h['uptrained']['tokens']} tokens in sequences of {r['data']['seq_len']}"
    lines = [
        "---",
        "tags: [clakit, cross-layer-attention, cla]",
        "---",
        "# CLA model, uptrained with clakit",
        "",
        start + ". Cross-Layer Attention: consumer layers reuse their producer's K/V, so the KV cache is smaller.",
        "Load with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` (or `import clakit`).",
        "",
        "## Held-out results",
        f"Data: {data}.",
        "",
        "| model | loss | perplexity | vs original |",
        "|---|---|---|---|",
        *rows,
        "",
        "## Training",
        *_training_lines(s),
        "",
        f"Full settings and versions: `{PROVENANCE}`.",
        "",
    ]
    layout = s.get("kv_source_layers")
    if layout:  # how to serve it, and the cache capacity to expect (the converted checkpoint's card says the same)
        lines += [serving_section(len(set(layout)), len(layout))]
    return "\n".join(lines)


def write(out: Path, s: dict) -> None:
    """README.md (the converter's card, if any, is kept below ours) and uptrain.json."""
    readme = out / "README.md"
    previous = readme.read_text() if readme.is_file() else ""
    readme.write_text(markdown(s) + ("\n## Conversion\n" + previous if previous else ""))
    (out / PROVENANCE).write_text(json.dumps(provenance(**s), indent=1))
