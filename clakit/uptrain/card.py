"""The uptrained checkpoint's model card (README.md) and provenance (uptrain.json)."""

import dataclasses
import json
import re
from pathlib import Path

import yaml

from clakit.convert.output_folder import RECORD_FILE, serving_section
from clakit.eval.lineage import record_or_none as read_record  # a damaged record: None, the card still names it
from clakit.markup import md_code, md_text
from clakit.provenance import UPTRAIN_RECORD, library_versions, provenance

PROVENANCE = UPTRAIN_RECORD
# what builds the adapters (peft: LoRA's initialisation, dropout and merge) and runs the loop (accelerate: seeding,
# mixed precision, the processes): a rerun under other versions of either may train other weights
TRAINING_LIBRARIES = ("peft", "accelerate")


def run_provenance(**extra) -> dict:
    """clakit.provenance plus the training libraries' versions: what uptrain's records (run.json, state.json,
    uptrain.json) say about the software that wrote them."""
    import torch

    # CPU reductions split by thread: convert's and eval's records name the count, uptrain's did not
    return provenance(**library_versions(TRAINING_LIBRARIES), torch_threads=torch.get_num_threads(), **extra)


def _trained_text(s: dict) -> str:
    """How many parameters trained, of the model's own (a record before adapter_parameters counted them in it)."""
    adapters = s.get("adapter_parameters")
    if not adapters:
        return f"{s['trainable_parameters']:,} of {s['parameters']:,} parameters trained"
    return (f"{s['trainable_parameters']:,} parameters trained ({adapters:,} of them in the LoRA adapters, merged "
            f"into the weights), of {s['parameters']:,} in the model")  # fmt: skip


def summary(recipe, trainer, data, heldout: dict, kv_source_layers: list[int] | None = None) -> dict:
    """Everything the card shows: settings, token counts, before/after held-out numbers, the sharing layout, and
    where it trained (the device, mixed precision and launch accelerate actually used, not the recipe's wish)."""
    trainable, total, adapters = trainer.counts
    acc = trainer.accelerator
    return {
        "recipe": recipe.to_dict(),
        "fingerprint": recipe.fingerprint(),
        "device": str(acc.device),
        "mixed_precision": str(acc.mixed_precision),
        "distributed_type": str(getattr(acc.distributed_type, "value", acc.distributed_type)),
        "steps": trainer.step,
        # the schedule as resolved from the recipe (steps from max_tokens or epochs, warmup from warmup_ratio)
        "plan": dataclasses.asdict(trainer.plan),
        "train_tokens": trainer.step * trainer.plan.tokens_per_step,
        "train_seconds": round(trainer.elapsed, 1),
        "trainable_parameters": trainable,
        "parameters": total,  # the saved model's
        "adapter_parameters": adapters,  # trained, then merged into the weights
        "processes": trainer.accelerator.num_processes,
        # the step as the last stretch ran it: a resume on another number of processes keeps the run's blocks a step
        # (the same data and schedule) with another per-process batch and accumulation (trainer.step_shape)
        "step_shape": {
            "per_device_train_batch_size": trainer.shape.batch_size,
            "gradient_accumulation_steps": trainer.shape.accumulation,
            "processes": trainer.shape.world,
            "blocks_per_step": trainer.shape.blocks,
        },
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
    """The run's last line. The converted model's report can be missing (a resumed FSDP run killed before it scored
    the converted model, or eval/converted.json removed): the line says so instead of failing after training."""
    h = s["heldout"]
    before = f"{h['converted']['perplexity']:.2f}" if h.get("converted") else "n/a"
    orig = f", original {h['original']['perplexity']:.2f}" if h.get("original") else ""
    return f"held-out perplexity {before} -> {h['uptrained']['perplexity']:.2f}{orig} after {s['train_tokens']} tokens"


def _training_lines(s: dict) -> list[str]:
    r = s["recipe"]
    t, lo, d, data = r["train"], r["lora"], r["distill"], r["data"]
    shape = s.get("step_shape") or t  # records from before step_shape: the recipe's
    batch = f"{shape['per_device_train_batch_size']} x {shape['gradient_accumulation_steps']} accumulation"
    share = data.get("copy_fraction") or 0  # records from before data.copy_fraction have none
    copies = f"; {share:g} of them end with a copy of an earlier span of {data['copy_span']} tokens" if share else ""
    device = f" ({s['device']}, mixed precision {s['mixed_precision']})" if s.get("device") else ""
    started = started_processes(s)
    if started not in (None, s["processes"]):  # the last stretch's processes; a step keeps the start's blocks
        device += f"; resumed: it started on {started} process(es), each step reads as many blocks as then"
    return [
        f"- {s['steps']} steps, {s['train_tokens']} tokens, {s['train_seconds']} s on {s['processes']} "
        f"process(es){device}",
        f"- data: {', '.join(s['train_data'])}, windows of {data['seq_len']}{copies}",
        f"- learning_rate {t['learning_rate']}, {t['lr_scheduler_type']} schedule, {_warmup_text(s)}, batch {batch}, "
        f"bf16 {t['bf16']}, seed {t['seed']}",
        f"- {_lora_text(lo)}; trained in full: {lo['full_train'] or 'nothing'}; {_trained_text(s)}",
        f"- distillation weight {d['weight']}, temperature {d['temperature']}, "
        f"hidden-state MSE weight {d['hidden_mse_weight']}",
    ]


def _warmup_text(s: dict) -> str:
    """The warmup the run had: train.warmup_steps, or the steps train.warmup_ratio came to (records from before the
    plan was kept name the settings only)."""
    t, plan = s["recipe"]["train"], s.get("plan")
    if plan is None:
        return f"warmup {t['warmup_steps']} steps / ratio {t['warmup_ratio']}"
    ratio = f" (warmup_ratio {t['warmup_ratio']:g})" if not t["warmup_steps"] and t["warmup_ratio"] else ""
    return f"warmup {plan['warmup_steps']} of {plan['total_steps']} steps{ratio}"


def _lora_text(lo: dict) -> str:
    """r 0 trains no adapter (only full_train learns): the card must not name LoRA targets then."""
    if not lo["r"] or not lo["target_modules"]:
        return "no LoRA"
    return f"LoRA r={lo['r']} alpha={lo['lora_alpha']} dropout={lo['lora_dropout']} on {lo['target_modules']} (merged)"


def _original_text(original: dict | None) -> str:
    if not original:
        return ""
    at = f" at revision {original['revision']}" if original.get("revision") else ""
    name = md_code(original.get("spec") or original.get("path"), table=False)
    return f"; original model (teacher / baseline) {name}{at}"


def markdown(s: dict) -> str:
    lines = [*_title_lines(s), *_heldout_lines(s), "## Training", *_training_lines(s), *_resolved_lines(s), ""]
    lines += [f"Full settings and versions: `{PROVENANCE}`.", "", *_recipe_lines(s)]
    layout = s.get("kv_source_layers")
    if layout:  # how to serve it, and the cache capacity to expect (the converted checkpoint's card says the same)
        lines += [serving_section(len(set(layout)), len(layout))]
    return "\n".join(lines)


def _title_lines(s: dict) -> list[str]:
    """Front matter, title, where training started and how to load the result."""
    m = s["recipe"]["model"]
    converted = " (converted with the `model.convert` settings of the recipe below)" if m["convert"] else ""
    start = md_code(m["path"] or m["source"], table=False)
    start = f"Started from {start}{converted}{_original_text(s.get('original'))}"
    return [
        "---",
        "tags: [clakit, cross-layer-attention, cla]",
        "---",
        "# CLA model, uptrained with clakit",
        "",
        start + ". Cross-Layer Attention: consumer layers reuse their producer's K/V, so the KV cache is smaller.",
        "Load with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` (or `import clakit`).",
        "",
    ]


def _heldout_lines(s: dict) -> list[str]:
    """The held-out table: original, the start (before: converted, or uptrained by an earlier run) and uptrained,
    each against the original. An uptrained start was labelled "converted (before)"."""
    h = s["heldout"]
    before = "start (before; uptrained earlier)" if s.get("start_uptrain") is not None else "converted (before)"
    names = (("original", "original (full KV)"), ("converted", before), ("uptrained", "uptrained"))
    data = f"{md_text(', '.join(s['eval_data']))}; {h['uptrained']['tokens']} tokens in sequences of "
    return [
        "## Held-out results",
        f"Data: {data}{s['recipe']['data']['seq_len']}.",
        "",
        "| model | loss | perplexity | vs original |",
        "|---|---|---|---|",
        *(_row(n, h.get(k), h.get("original")) for k, n in names),
        "",
    ]


def _resolved_lines(s: dict) -> list[str]:
    """Recipe keys left null whose value the machine chose (resolved_defaults; records before it have none)."""
    resolved = s.get("resolved") or {}
    return [f"- {key}: {r.get('value')} ({r.get('why')})" for key, r in resolved.items() if isinstance(r, dict)]


def _recipe_lines(s: dict) -> list[str]:
    """The recipe as the run resolved it (every key, the overrides applied) and how to rerun it. Relative paths in
    it are relative to the folder this session ran in (`cwd`, when the record knows it): the recipe shown is the one
    it was given, whose paths a --resume from another folder may have retyped (the first session's: `started`)."""
    where = f" in {md_code(s['cwd'], table=False)}" if s.get("cwd") else ""
    return [
        "## Recipe",
        "",
        f"The recipe as run, every key resolved (fingerprint `{s.get('fingerprint')}`). To rerun it, save this block"
        f" as `recipe.yaml` and run {_rerun_command(s)}{where} (its relative paths are relative to that folder); with"
        " the same data, versions and device it trains the same weights.",
        "",
        "```yaml",
        yaml.safe_dump(s["recipe"], sort_keys=False).rstrip("\n"),
        "```",
        "",
    ]


def _rerun_command(s: dict) -> str:
    """The command line that reruns the run, on the processes it started on: a step reads batch x accumulation x
    processes blocks, so `clakit uptrain` alone (1 process) after a 2-process run trained half the tokens a step, other
    weights under the same fingerprint."""
    rerun = "clakit uptrain recipe.yaml train.output_dir=NEW_FOLDER"
    n = started_processes(s)
    if n is None or n == 1:
        return f"`{rerun}`"
    blocks = s["step_shape"]["blocks_per_step"]
    return (
        f"`accelerate launch --num_processes {n} -m {rerun}` ({n} processes, as it "
        f"started: a step reads {blocks} blocks; on CPUs `ACCELERATE_USE_CPU=1 torchrun --nproc_per_node {n} -m "
        f"{rerun}`)"
    )


def started_processes(s: dict) -> int | None:
    """The processes the run started on: the blocks a step reads over the recipe's batch x accumulation (a resume
    on other processes keeps the blocks a step); None for a record that cannot say (from before step_shape)."""
    train = (s.get("recipe") or {}).get("train") or {}
    per = [train.get("per_device_train_batch_size"), train.get("gradient_accumulation_steps")]
    blocks = (s.get("step_shape") or {}).get("blocks_per_step")
    if not all(type(v) is int and v > 0 for v in [*per, blocks]) or blocks % (per[0] * per[1]):
        return None
    return blocks // (per[0] * per[1])


_UNREAD = object()  # origins' conversion record not read by the caller


def origins(start: Path, original: dict | None, conversion=_UNREAD) -> dict:
    """Where the trained weights came from, for uptrain.json: the CLA checkpoint training started from, its
    conversion record (the source it was converted from, at which revision, with which settings) and the original
    model (teacher / baseline) as resolved when the run started (run.json: the path or Hub commit it read). A start
    uptrained by clakit before (its model/ as model.path) holds no conversion record of its own: its uptrain.json is
    kept as `start_uptrain`, and the conversion it descends from is taken from there. `conversion`: `start`'s
    conversion record as the caller read it (`conversion_record`: None when absent or damaged), else it is read
    here."""
    conversion = conversion_record(start) if conversion is _UNREAD else conversion
    earlier = read_record(start / PROVENANCE)
    if conversion is None and earlier is not None:
        conversion = earlier.get("conversion")
    return {"start_checkpoint": str(start), "conversion": conversion, "start_uptrain": earlier, "original": original}


def conversion_record(start: Path) -> dict | None:
    """`start`'s clakit_convert.json (read_record: None when absent or damaged)."""
    return read_record(start / RECORD_FILE)


def resolved_defaults(recipe, record: dict | None) -> dict:
    """{recipe key: {"value", "why"}} for the keys the recipe left null whose value the machine decided:
    model.convert.distill_steps (distill_resolution), as the conversion record (`record`: the start checkpoint's
    clakit_convert.json, `conversion_record`; the caller reads it once for this and `origins`) says it ran."""
    c, record = recipe.model.convert, record or {}
    if c is None or c.distill_steps is not None or not isinstance(record.get("settings"), dict):
        return {}
    pin = "pin it with model.convert.distill_steps=N (then a device too small is refused, not skipped)"
    return {"model.convert.distill_steps": distill_resolution(record, pin)}


def distill_resolution(record: dict, pin: str) -> dict:
    """{"value", "why"} of a conversion's distill_steps left to its default (`record`: its clakit_convert.json): the
    default DEFAULT_DISTILL_STEPS where the whole student fits the device's free memory (CUDA: the driver's count,
    CPU: MemAvailable), 0 where not, so the same command converts differently on another machine (or the same one,
    busier); `pin` says how to fix it. The record's distill.skipped says why where it has one; an older record's
    reason is read from its settings."""
    from clakit.convert.config import DEFAULT_DISTILL_STEPS
    from clakit.convert.pipeline import DATA_AWARE_INITS

    settings, skipped = record["settings"], (record.get("distill") or {}).get("skipped")
    steps, layout = settings.get("distill_steps"), settings.get("kv_source_layers") or []
    if skipped and not steps:
        why = f"0: the default ({DEFAULT_DISTILL_STEPS}) was skipped: {skipped}"
    elif steps:
        why = f"the default ({DEFAULT_DISTILL_STEPS}): the whole student fitted the device's free memory"
    elif settings.get("init") not in DATA_AWARE_INITS:
        why = f"0: init {settings.get('init')} fits nothing to distil"
    elif len(set(layout)) == len(layout):
        why = "0: every layer is a producer, nothing shares K/V"
    else:
        why = (
            f"0: the default ({DEFAULT_DISTILL_STEPS}) was skipped, the whole student did not fit the device's free "
            "memory (CPU: MemAvailable) when the conversion ran"
        )
    return {"value": steps, "why": f"{why}; {pin}"}


def _front_matter_dropped(text: str) -> str:
    """A card without its leading `---` YAML block (one card has one, at its top)."""
    if text.startswith("---\n"):
        end = text.find("\n---\n", 4)
        return text[end + 5 :].lstrip("\n") if end >= 0 else text
    return text


NESTED_DEPTH = 2  # the start's card sits under our `## ` heading: its `# ` title becomes `### `


def demoted(text: str, levels: int = NESTED_DEPTH) -> str:
    """A card nested under a heading of ours, every ATX heading `levels` deeper (at most `######`, markdown's
    deepest): kept as they were, an earlier uptraining's `# CLA model, uptrained with clakit` and `## Recipe` stood
    beside ours as the card's own title and sections. Lines inside ``` fences (YAML, shell comments) are not
    headings and stay as they are."""
    lines, fenced = [], False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            marks = len(line) - len(line.lstrip("#"))
            if marks <= 6 and line[marks : marks + 1] in (" ", ""):  # `#tag` or `####### x` is text, not a heading
                line = "#" * min(6, marks + levels) + line[marks:]
        lines.append(line)
    return "\n".join(lines)


def write(out: Path, s: dict, start: Path | None = None) -> None:
    """README.md (the start checkpoint's card, the converter's or an earlier uptraining's, kept below ours) and
    uptrain.json."""
    heading, nested = _nested_card(s, start)
    record = run_provenance(**s)  # the card names the working directory the recipe's relative paths start from
    (out / "README.md").write_text(markdown(record) + (f"\n## {heading}\n\n" + nested if nested else ""))
    (out / PROVENANCE).write_text(json.dumps(record, indent=1))


def _nested_card(s: dict, start: Path | None) -> tuple[str, str]:
    """(our heading for it, the start checkpoint's card): its file names pointed at where uptrain.json keeps those
    records, the serving section ours repeats dropped, its headings demoted below ours."""
    previous = start / "README.md" if start is not None else None
    text = _front_matter_dropped(previous.read_text()) if previous and previous.is_file() else ""
    heading = "Conversion"
    if s.get("start_uptrain") is not None:  # an earlier uptraining's card: its records are our start_uptrain
        heading = "Start checkpoint (uptrained before)"
        text = text.replace(f"`{PROVENANCE}`", f"`{PROVENANCE}` (its `start_uptrain`)")
    # the conversion record is not copied beside the result (it would make model/ look like a convert output):
    # uptrain.json holds it, under "conversion"
    text = text.replace(f"`{RECORD_FILE}`", f"`{PROVENANCE}` (its `conversion`)")
    layout = s.get("kv_source_layers")
    if layout:  # the same layout's serving section is in our part already (matched before it is demoted), by its
        # heading and last line: an earlier clakit's wording of it (the install line changed) was kept twice
        text = re.sub(r"## Serve with vLLM\n.*?docs/serving\.md\.\n", "", text, flags=re.DOTALL)
    return heading, demoted(text)
