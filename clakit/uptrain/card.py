"""The uptrained checkpoint's model card (README.md) and provenance (uptrain.json)."""

import json
from pathlib import Path

from clakit.provenance import provenance

PROVENANCE = "uptrain.json"


def summary(recipe, trainer, data, start: dict, end: dict) -> dict:
    """Everything the card shows: settings, token counts, before/after held-out numbers."""
    from clakit.uptrain.student import count_parameters

    trainable, total = count_parameters(trainer.accelerator.unwrap_model(trainer.model))
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
        "heldout": {**start, **end},
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


def markdown(s: dict) -> str:
    r, h = s["recipe"], s["heldout"]
    m, t, lo, d = r["model"], r["train"], r["lora"], r["distill"]
    rows = [
        _row(n, h.get(k), h.get("original"))
        for k, n in (
            ("original", "original (full KV)"),
            ("converted", "converted (before)"),
            ("uptrained", "uptrained"),
        )
    ]
    return "\n".join(
        [
            "---",
            "tags: [clakit, cross-layer-attention, cla]",
            "---",
            "# CLA model, uptrained with clakit",
            "",
            f"Started from `{m['path'] or m['source']}`"
            + (f" (converted with {m['convert']})" if m["convert"] else "")
            + ". Cross-Layer Attention: consumer layers reuse their producer's K/V, so the KV cache is smaller.",
            "Load with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` (or `import clakit`).",
            "",
            "## Held-out results",
            f"Data: {', '.join(s['eval_data'])}; {h['uptrained']['tokens']} tokens, sequences of {r['data']['seq_len']}.",
            "",
            "| model | loss | perplexity | vs original |",
            "|---|---|---|---|",
            *rows,
            "",
            "## Training",
            f"- {s['steps']} steps, {s['train_tokens']} tokens, {s['train_seconds']} s on {s['processes']} process(es)",
            f"- data: {', '.join(s['train_data'])}",
            f"- learning_rate {t['learning_rate']}, {t['lr_scheduler_type']} schedule, warmup {t['warmup_steps']} steps"
            f" / ratio {t['warmup_ratio']}, batch {t['per_device_train_batch_size']} x {t['gradient_accumulation_steps']}"
            f" accumulation, bf16 {t['bf16']}, seed {t['seed']}",
            f"- LoRA r={lo['r']} alpha={lo['lora_alpha']} dropout={lo['lora_dropout']} on {lo['target_modules']}"
            f" (merged); trained in full: {lo['full_train'] or 'nothing'}; {s['trainable_parameters']:,} of"
            f" {s['parameters']:,} parameters trained",
            f"- distillation weight {d['weight']}, temperature {d['temperature']}, hidden MSE {d['hidden_mse_weight']}",
            "",
            f"Full settings and versions: `{PROVENANCE}`.",
            "",
        ]
    )


def write(out: Path, s: dict) -> None:
    """README.md (the converter's card, if any, is kept below ours) and uptrain.json."""
    readme = out / "README.md"
    previous = readme.read_text() if readme.is_file() else ""
    readme.write_text(markdown(s) + ("\n## Conversion\n" + previous if previous else ""))
    (out / PROVENANCE).write_text(json.dumps(provenance(**s), indent=1))
