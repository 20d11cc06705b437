"""Every bad value clakit must refuse before it writes anything, as one table: exit 2, one line naming the problem
and the fix, no traceback, nothing written anywhere under the test folder.

Placeholders: {tmp} the test folder, {model} a stock tiny Llama, {cla} a tiny CLA2 checkpoint, {data} a folder with
train.txt / heldout.txt, {recipe} a tiny uptrain recipe on them (output_dir {tmp}/run), {report} a clakit eval
report. Setup helpers add damaged files: {gz} a truncated .txt.gz, {notgz} a .txt.gz that is no gzip, {bin} binary
data named .txt, {bad} a report with one field changed.
"""

import gzip
import json
import shutil
from pathlib import Path

import pytest
import yaml
from bad_input import Case, check, make_folder, run_clakit
from conftest import make_text, tiny_model
from uptrain_fixtures import tiny_cla_checkpoint, tiny_recipe  # noqa: F401

from clakit.eval import evaluate, write_json

UP = "uptrain {recipe} -q "  # the tiny recipe; each case appends its overrides
EVAL = "eval {model} -o {tmp}/r.json --data {data}/heldout.txt --seq-len 32 --max-tokens 64 --no-speed -q "
CONVERT = "convert {model} {tmp}/out -q "


def truncated_gz(paths: dict) -> None:
    """{gz}: the first 2 kB of a gzipped text (a download cut short: EOFError, not OSError, from gzip)."""
    whole = gzip.compress(Path(paths["data"], "train.txt").read_bytes())
    Path(paths["tmp"], "cut.txt.gz").write_bytes(whole[:2000])
    paths["gz"] = str(Path(paths["tmp"], "cut.txt.gz"))


def undecodable_txt(paths: dict) -> None:
    """A text file in {data} whose name holds a byte UTF-8 cannot decode (kept by Python as a lone surrogate)."""
    shutil.copy(Path(paths["data"], "train.txt"), Path(paths["data"], "x\udcff.txt"))


def binary_txt(paths: dict) -> None:
    """{bin}: a safetensors shard named .txt (tokenised as noise if read with errors="replace")."""
    shard = sorted(Path(paths["model"]).glob("*.safetensors"))[0]
    paths["bin"] = str(shutil.copy(shard, Path(paths["tmp"], "weights.txt")))


def write_file(name: str, content: bytes | str) -> callable:
    """setup: {tmp}/NAME with `content` (placeholder: NAME up to its first dot, {notgz} for notgz.txt.gz)."""

    def setup(paths: dict) -> None:
        path = Path(paths["tmp"], name)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        paths[name.split(".")[0]] = str(path)

    return setup


def link_loop(paths: dict) -> None:
    """{loop}: a link to itself, {dangling}: a link to nothing; names that also read as a Hub dataset's NAME."""
    for name, target in (("loop", "loop"), ("dangling", "nothing-here")):
        Path(paths["tmp"], name).symlink_to(target)
        paths[name] = str(Path(paths["tmp"], name))


def with_recipe_text(transform) -> callable:
    """setup: {r2}, the tiny recipe's YAML text passed through `transform`."""

    def setup(paths: dict) -> None:
        text = transform(Path(paths["recipe"]).read_text())
        paths["r2"] = str(Path(paths["tmp"], "r2.yaml"))
        Path(paths["r2"]).write_text(text)

    return setup


def bad_report(change) -> callable:
    """setup: {bad}, the clakit eval report {report} with `change(report)` applied."""

    def setup(paths: dict) -> None:
        report = json.loads(Path(paths["report"]).read_text())
        change(report)
        paths["bad"] = str(Path(paths["tmp"], "bad.json"))
        Path(paths["bad"]).write_text(json.dumps(report))

    return setup


def set_field(*keys, value) -> callable:
    def change(report: dict) -> None:
        for k in keys[:-1]:
            report = report[k]
        report[keys[-1]] = value

    return change


# a passkey section as `clakit eval --task passkey` writes it (one length, one depth), for the damaged reports below
PASSKEY = {
    "accuracy": 0.5,
    "cells": [{"length": 200, "depth": 0.5, "accuracy": 0.5, "correct": 1, "samples": 2}],
    "settings": {"lengths": [200], "depths": [0.5], "samples": 2, "seed": 0, "new_tokens": 8},
}

CASES = [
    # --- the environment: a WORLD_SIZE that is no count (ValueError traceback); an empty --device (taken as auto)
    Case(UP, "WORLD_SIZE='abc' is not a number of processes", env={"WORLD_SIZE": "abc"}, subprocess_run=True,
         id="world-size-not-a-number"),
    Case(EVAL + "--device=", "unknown --device ''", id="eval-device-empty"),
    # --- recipe values out of range (issue 14's list first)
    Case(UP + "train.logging_steps=0", "train.logging_steps must be >= 1"),
    Case(UP + "train.adam_beta1=1.5", "train.adam_beta1 must be in [0, 1)"),
    Case(UP + "train.adam_beta2=-0.1", "train.adam_beta2 must be in [0, 1)"),
    Case(UP + "train.adam_beta2=1", "train.adam_beta2 must be in [0, 1)"),
    Case(UP + "train.weight_decay=-1", "train.weight_decay must be >= 0"),
    Case(UP + "lora.lora_dropout=1.5", "lora.lora_dropout must be in [0, 1)"),
    Case(UP + "lora.lora_dropout=1", "lora.lora_dropout must be in [0, 1)"),
    Case(UP + "lora.lora_dropout=-0.1", "lora.lora_dropout must be in [0, 1)"),
    Case(UP + "train.learning_rate=.inf", "recipe key train.learning_rate must be a finite number, got inf"),
    Case(UP + "train.learning_rate=.nan", "recipe key train.learning_rate must be a finite number"),
    Case(UP + "train.learning_rate=-.inf", "recipe key train.learning_rate must be a finite number"),
    Case(UP + "train.learning_rate=inf", "recipe key train.learning_rate must be a finite number"),
    Case(UP + "train.learning_rate=0", "train.learning_rate must be > 0"),
    Case(UP + "train.learning_rate=-1e-3", "train.learning_rate must be > 0"),
    Case(UP + "train.learning_rate=1e999", "recipe key train.learning_rate must be a finite number"),
    Case(UP + "train.max_steps=-1 train.max_tokens=-100", "train.max_tokens must be a positive number of tokens"),
    Case(UP + "train.max_steps=-1 train.max_tokens=0", "train.max_tokens must be a positive number of tokens"),
    Case(UP + "train.max_steps=0", "train.max_steps must be a positive number of steps, or -1"),
    Case(UP + "train.max_steps=-7", "train.max_steps must be a positive number of steps, or -1"),
    Case(UP + "train.max_steps=-1 train.num_train_epochs=0", "train.num_train_epochs must be > 0"),
    Case(UP + "train.max_steps=-1 train.num_train_epochs=.inf", "train.num_train_epochs must be a finite number"),
    Case(UP + "train.seed=1180591620717411303424", "train.seed must be between 0 and 2**32 - 1", id="seed-2**70"),
    Case(UP + "train.seed=4294967296", "train.seed must be between 0 and 2**32 - 1"),
    Case(UP + "train.seed=-1", "train.seed must be between 0 and 2**32 - 1"),
    Case(UP + "train.seed=2**70", "recipe key train.seed must be an integer, got '2**70'"),
    Case(UP + "train.save_steps=-1", "train.save_steps must be >= 0 (0: no intermediate checkpoints)"),
    Case(UP + "train.save_total_limit=0", "train.save_total_limit must be >= 1, or null"),
    Case(UP + "train.eval_steps=-1", "train.eval_steps must be >= 0"),
    Case(UP + "train.warmup_steps=-1", "train.warmup_steps must be >= 0"),
    Case(UP + "train.warmup_ratio=1", "train.warmup_ratio must be in [0, 1)"),
    Case(UP + "train.lr_scheduler_type=constant", "train.lr_scheduler_type constant has no warmup",
         id="constant-schedule-with-warmup"),
    Case(UP + "train.max_steps=1", "the run has 1 step and a warmup, whose first step trains at learning rate 0",
         id="one-step-with-warmup"),
    Case(UP + "train.max_steps=-1 train.max_tokens=10 train.warmup_steps=0 train.warmup_ratio=0.5",
         "set train.warmup_steps=0 train.warmup_ratio=0, or train more steps", id="one-step-from-tokens-with-warmup"),
    # --dry-run passed both; the run refused them
    Case(UP + "--dry-run train.max_steps=4 train.warmup_steps=0 train.warmup_ratio=0.9",
         "the warmup (4 steps from train.warmup_ratio=0.9) is not shorter than the run (train.max_steps=4)",
         id="dry-run-warmup-ratio-as-long-as-the-run"),
    Case(UP + "--dry-run 'train.report_to=[tensorboard]'", "train.report_to asks for tensorboard, which is not "
         "installed", id="dry-run-tensorboard-missing"),
    # a model.convert the stock model's config already refuses: --dry-run passed it, the run refused it only after
    # reading the text (~50 s on SmolLM2)
    Case(UP + "--dry-run model.path=null model.source={model} 'model.convert={{factor: 2, init: mean, distill_steps: "
         "5}}'", "--distill-steps is model.convert.distill_steps", id="dry-run-convert-distill-with-mean"),
    Case(UP + "--dry-run model.path=null model.source={model} 'model.convert={{init: calibrated, factor: 2, "
         "calib_data: [{data}/train.txt], seq_len: 64, distill_copy_span: 40}}'",
         "--distill-copy-span (40) must be at most half the 64-token window", id="dry-run-convert-copy-span"),
    Case(UP + "model.path=null model.source={model} 'model.convert={{init: calibrated, factor: 2, calib_data: "
         "[{data}/train.txt], seq_len: 64, calib_tokens: 10}}'",
         "--calib-tokens (10) must be at least the sequence length (64)", id="convert-calib-tokens-below-a-window"),
    Case(UP + "train.adam_epsilon=0", "train.adam_epsilon must be > 0"),
    Case(UP + "train.max_grad_norm=-1", "train.max_grad_norm must be >= 0 (0: no clipping)"),
    Case(UP + "train.max_grad_norm=.nan", "train.max_grad_norm must be a finite number"),
    Case(UP + "train.per_device_train_batch_size=0", "train.per_device_train_batch_size must be >= 1"),
    Case(UP + "train.gradient_accumulation_steps=-2", "train.gradient_accumulation_steps must be >= 1"),
    Case(UP + "lora.lora_alpha=0", "lora.lora_alpha must be > 0"),
    Case(UP + "lora.r=-1", "lora.r must be >= 0"),
    Case(UP + "lora.target_modules=[]", "nothing to train"),
    Case(UP + "distill.temperature=.inf", "distill.temperature must be a finite number"),
    Case(UP + "distill.temperature=0", "distill.temperature must be > 0"),
    Case(UP + "distill.weight=1.5", "distill.weight must be between 0 and 1"),
    Case(UP + "data.eval_fraction=.nan", "data.eval_fraction must be a finite number"),
    Case(UP + "data.seq_len=4", "data.seq_len must be at least 8"),
    Case(UP + "data.seq_len=300 data.eval_max_tokens=600", "data.seq_len 300 exceeds the context window of",
         id="seq-len-above-max-position-embeddings"),
    Case(UP + "model.path=null 'model.source={model}' 'model.convert={{factor: 2}}' data.seq_len=257 "
         "data.eval_max_tokens=600", "(max_position_embeddings 256); use at most 256",
         id="seq-len-above-source-window"),
    Case(UP + "data.copy_fraction=-0.1", "data.copy_fraction must be between 0 and 1"),
    Case(UP + "data.copy_fraction=1.5", "data.copy_fraction must be between 0 and 1"),
    Case(UP + "data.copy_fraction=0.5 data.copy_span=9999", "data.copy_span must be between 1 and data.seq_len / 2"),
    Case(UP + "data.copy_fraction=0.5 data.copy_span=0", "data.copy_span must be between 1 and data.seq_len / 2"),
    Case(UP + "data.eval=null data.train=[{data}/train.txt,{data}/../data/train.txt]",
         "data.train names the same text twice", id="train-file-twice"),
    Case(UP + "data.train=[{data},{data}/train.txt]", "data.train names the same text twice",
         id="train-folder-and-its-file"),
    Case(UP + "model.path=null 'model.source={model}' 'model.convert={{init: calibrated, calib_data: [{data}]}}'",
         "heldout.txt is (or holds) calibration text", id="eval-data-is-calibration-data"),
    Case(UP + "data.eval=[{data}/heldout.txt,{data}/./heldout.txt] data.train=[{data}/train.txt]",
         "data.eval names the same text twice", id="eval-file-twice"),
    Case(UP + "model.path=null 'model.source={model}' "
         "'model.convert={{init: calibrated, calib_data: [{data}/train.txt, {data}/train.txt]}}'",
         "model.convert.calib_data names the same text twice", id="recipe-calib-file-twice"),
    Case(CONVERT + "--calib-data {data}/train.txt {data}/train.txt", "--calib-data names the same text twice",
         id="convert-calib-file-twice"),
    Case(CONVERT + "--calib-data {data} {data}/train.txt", "--calib-data names the same text twice",
         id="convert-calib-folder-and-its-file"),
    Case(EVAL + "--data {data}/heldout.txt {data}/../data/heldout.txt", "--data names the same text twice",
         id="eval-data-file-twice"),
    Case(UP + "data.eval=[{data}/train.txt]", "is (or holds) training text", id="eval-data-is-train-data"),
    Case(UP + "data.eval=[{data}]", "is (or holds) training text", id="eval-folder-holds-train-data"),
    Case(UP + "data.train=[{data}] data.eval=[{data}/heldout.txt]", "is (or holds) training text",
         id="eval-data-inside-train-folder"),
    Case(UP + "model.path=null 'model.source={model}' 'model.convert={{factor: 2, seed: -1}}'",
         "recipe section model.convert: --seed must be between 0 and 2**32 - 1", id="convert-seed"),
    Case(UP + "model.path=null 'model.source={model}' 'model.convert={{layout: auto, kv_saving: 1.5}}'",
         "model.convert.kv_saving must be between 0 and 1", id="convert-kv-saving"),
    # model.original without distillation: still the "original" baseline report and run.json's provenance
    Case(UP + "model.original={tmp}/gone", "/gone does not exist; give the checkpoint folder or .gguf file the model",
         id="original-missing-without-distillation"),
    Case(UP + "model.original=smol-typo", "model.original smol-typo does not exist", id="original-name-typo"),
    Case(UP + "model.original={data}", "is not a model checkpoint folder (no config.json)", id="original-not-a-model"),
    Case(UP + "model.original={cla} distill.weight=1", "is a CLA checkpoint (its layers share K/V), not the original",
         id="teacher-is-the-student"),
    Case(UP + "model.original={cla}", "is a CLA checkpoint (its layers share K/V), not the original model: give as",
         id="original-baseline-is-a-cla-model"),  # without distillation: the "original" report compared CLA to CLA
    # --- recipe files and overrides that are not valid YAML
    Case(UP + "train.max_steps=[", "override 'train.max_steps=[': the value is not valid YAML"),
    Case(UP + "'train.output_dir={{'", "the value is not valid YAML", id="override-brace"),
    Case(UP + "'train.output_dir=!!python/object/apply:os.system [echo hi]'", "the value is not valid YAML",
         id="override-python-tag"),
    Case(UP + "=5", "must look like section.key=value"),
    Case(UP + "train.bogus=1", "unknown recipe key 'train.bogus'"),
    Case(UP + "lora.target_modules=q_proj,v_proj", "recipe key lora.target_modules is a list: write [q_proj, v_proj]",
         id="list-written-with-commas"),  # it became one pattern 'q_proj,v_proj' that matches nothing
    Case("uptrain {latin1} -q", "is not UTF-8 text (byte 0xe9", write_file("latin1.yaml", "model: {path: caf\xe9}"
         .encode("latin-1")), id="recipe-not-utf8"),
    Case("uptrain {dup} -q", "key 'learning_rate' is given twice",
         write_file("dup.yaml", "train: {learning_rate: 1e-3, learning_rate: 1e-2}"), id="recipe-duplicate-key"),
    Case("uptrain {r2} -q", "key 'train' is given twice", with_recipe_text(lambda t: t + "train: {max_steps: 2}\n"),
         id="recipe-duplicate-section"),
    # a list or mapping as a key: `key in seen` was a TypeError traceback (exit 1)
    Case("uptrain {unhash} -q", "not valid YAML at line 1: a list is given as a key; keys are names",
         write_file("unhash.yaml", "distill: {weight: 0.5, ? [a, b] : 1}"), id="recipe-unhashable-key"),
    Case(UP + "'distill={{[a]: 1}}'", "not valid YAML (a list is given as a key; keys are names)",
         id="override-unhashable-key"),
    # [] was "given" to the checks (eval_fraction unchecked) and "not given" to packing (the tail held out)
    Case(UP + "'data.eval=[]' data.eval_fraction=1.5", "data.eval is an empty list", id="eval-empty-list"),
    # "" is Path("."): the current folder's files were trained on, or held out
    Case(UP + "'data.train=[\"\", {data}/train.txt]'", "data.train has an empty name (''), which would read",
         id="train-empty-name"),
    Case(UP + "'data.eval=[\" \"]'", "data.eval has an empty name (' ')", id="eval-blank-name"),
    Case(CONVERT + "--init calibrated --calib-data ''", "--calib-data has an empty name ('')",
         id="convert-calib-empty-name"),
    # each text refusal names the flag or key that gave the text (it said "text data" for all of them)
    Case(EVAL + "--data ''", "--data has an empty name ('')", id="eval-data-empty-name"),
    Case(EVAL + "--data {tmp}/none.txt", "--data '", id="eval-data-missing-named"),
    Case(CONVERT + "--init calibrated --calib-data {tmp}/none.txt", "--calib-data '",
         id="convert-calib-missing-named"),
    Case(CONVERT + "--init mean --eval-data {tmp}/none.txt", "--eval-data '", id="convert-eval-missing-named"),
    Case(UP + "data.eval=[{tmp}/none.txt]", "data.eval '", id="uptrain-eval-missing-named"),
    Case("uptrain {lst} -q", "must be a YAML mapping", write_file("lst.yaml", "- a\n- b\n"), id="recipe-list"),
    Case("uptrain {empty} -q", "must be a YAML mapping", write_file("empty.yaml", ""), id="recipe-empty"),
    Case("uptrain {tab} -q", "is not valid YAML at line 2", write_file("tab.yaml", "train:\n\t- x\n"),
         id="recipe-tab"),
    Case("uptrain {mine} -q", "is a folder; give a recipe YAML file", make_folder("mine"), id="recipe-folder"),
    # --- text data: truncated .gz (EOFError), not gzip at all, binary data named .txt
    Case(UP + "data.train=[{gz}]", "the .gz file is truncated or damaged", truncated_gz, id="uptrain-train-gz"),
    Case(UP + "data.eval=[{gz}]", "the .gz file is truncated or damaged", truncated_gz, id="uptrain-eval-gz"),
    Case(UP + "data.train=[{notgz}]", "the .gz file is truncated or damaged (Not a gzipped file",
         write_file("notgz.txt.gz", "plain text"), id="uptrain-not-gzip"),
    Case(UP + "data.train=[{bin}]", "is not UTF-8 text (binary data?)", binary_txt, id="uptrain-binary-txt"),
    Case(EVAL + "--data {gz}", "the .gz file is truncated or damaged", truncated_gz, id="eval-gz"),
    Case(CONVERT + "--init calibrated --calib-data {gz}", "the .gz file is truncated or damaged", truncated_gz,
         id="convert-calib-gz"),
    Case(CONVERT + "--init mean --eval-data {gz}", "the .gz file is truncated or damaged", truncated_gz,
         id="convert-eval-gz"),
    Case(CONVERT + "--init calibrated --calib-data {bin}", "is not UTF-8 text", binary_txt, id="convert-calib-bin"),
    # --- a link that leads nowhere was looked up on the Hub as a dataset named like it (40 s offline, then "cannot
    # load dataset")
    Case(EVAL.replace("{data}/heldout.txt", "{loop}"), "/loop' is a link that leads to nothing",
         link_loop, id="eval-data-link-loop"),
    Case(CONVERT + "--init calibrated --calib-data {dangling}", "is a link that leads to nothing (its target",
         link_loop, id="convert-calib-dangling-link"),
    Case(UP + "data.eval=[{loop}]", "/loop' is a link that leads to nothing", link_loop,
         id="uptrain-eval-link-loop"),
    # --- eval settings
    Case(EVAL + "--kv-budget-gb inf", "--kv-budget-gb must be a positive number of GB, e.g. 16, got inf"),
    Case(EVAL + "--kv-budget-gb nan", "--kv-budget-gb must be a positive number of GB"),
    Case(EVAL + "--kv-budget-gb -1", "--kv-budget-gb must be a positive number of GB"),
    Case(EVAL + "--kv-budget-gb 0", "--kv-budget-gb must be a positive number of GB"),
    Case(EVAL + "--source-model {tmp}/nowhere", "does not exist", id="eval-source-model-missing"),
    Case(EVAL + "--source-model {lst}", "is neither a checkpoint folder nor a .gguf file",
         write_file("lst.yaml", "x"), id="eval-source-model-file"),
    # --- clakit report on reports with a field of the wrong type or range
    Case("report {report} {bad} -o {tmp}/rep", "perplexity must be a number >= 1, got '12.5'",
         bad_report(set_field("perplexity", value="12.5")), id="report-string-perplexity"),
    Case("report {bad} {report} -o {tmp}/rep", "perplexity must be a number >= 1, got 0",
         bad_report(set_field("perplexity", value=0)), id="report-baseline-perplexity-0"),
    Case("report {report} {bad} -o {tmp}/rep", "perplexity must be a number >= 1, got nan",
         bad_report(set_field("perplexity", value=float("nan"))), id="report-nan-perplexity"),
    Case("report {report} {bad} -o {tmp}/rep", "perplexity must be a number >= 1, got True",
         bad_report(set_field("perplexity", value=True)), id="report-bool-perplexity"),
    Case("report {report} {bad} -o {tmp}/rep", "kv_cache must be a mapping, got [1, 2]",
         bad_report(set_field("kv_cache", value=[1, 2])), id="report-list-kv-cache"),
    Case("report {report} {bad} -o {tmp}/rep", "kv_cache.bytes_per_token must be a positive number, got 0",
         bad_report(set_field("kv_cache", "bytes_per_token", value=0)), id="report-kv-bytes-0"),
    Case("report {report} {bad} -o {tmp}/rep", "kv_cache.saving_factor must be a positive number or null",
         bad_report(set_field("kv_cache", "saving_factor", value="2x")), id="report-saving-string"),
    Case("report {report} {bad} -o {tmp}/rep", "settings.seq_len must be a positive integer, got 32.0",
         bad_report(set_field("settings", "seq_len", value=32.0)), id="report-seq-len-float"),
    Case("report {report} {bad} -o {tmp}/rep", "data.sources must be a list of strings, got 'a.txt'",
         bad_report(set_field("data", "sources", value="a.txt")), id="report-sources-string"),
    Case("report {report} {bad} -o {tmp}/rep", "speed must be a mapping or null, got 'fast'",
         bad_report(set_field("speed", value="fast")), id="report-speed-string"),
    Case("report {report} {bad} -o {tmp}/rep", "speed.decode_tokens_per_s must be a positive number",
         bad_report(set_field("speed", value={"prefill_tokens_per_s": 10.0})), id="report-speed-incomplete"),
    Case("report {report} {bad} -o {tmp}/rep", "lm_eval.tasks must be a mapping of task -> {metric: number}",
         bad_report(set_field("lm_eval", value={"tasks": {"arc": {"acc": "high"}}})), id="report-lm-eval-string"),
    Case("report {bad} -o {tmp}/rep", "passkey.accuracy must be a number between 0 and 1, got 'high'",
         bad_report(set_field("passkey", value={**PASSKEY, "accuracy": "high"})), id="report-passkey-accuracy"),
    Case("report {bad} -o {tmp}/rep", "passkey.settings.lengths must be a list of positive integers, got []",
         bad_report(set_field("passkey", value={**PASSKEY, "settings": {"lengths": [], "depths": [0.5]}})),
         id="report-passkey-no-lengths"),
    Case("report {bad} -o {tmp}/rep", "passkey must be a mapping whose cells hold one accuracy for every length",
         bad_report(set_field("passkey", value={**PASSKEY, "cells": []})), id="report-passkey-no-cells"),
    Case("report {report} {bad} -o {tmp}/rep", "model must be a string, got 3",
         bad_report(set_field("model", value=3)), id="report-model-number"),
    Case("report {report} {bad} -o {tmp}/rep", "missing data", bad_report(lambda r: r.pop("data")),
         id="report-no-data"),
    # --- usage errors: one line and the help to read, not argparse's usage block
    Case("convert", "the following arguments are required: SRC, OUT; see `clakit convert --help`"),
    Case("eval {model}", "the following arguments are required: -o/--output; see `clakit eval --help`"),
    Case("bogus", "invalid choice: 'bogus'"),
    Case(CONVERT + "--seed x", "argument --seed: invalid int value: 'x'; see `clakit convert --help`"),
    Case(CONVERT + "--seed -1", "--seed must be between 0 and 2**32 - 1, got -1", id="convert-seed-negative"),
    Case(CONVERT + "--seed 4294967296", "--seed must be between 0 and 2**32 - 1", id="convert-seed-huge"),
    Case(CONVERT + "--reconstruct-lr inf", "--reconstruct-lr must be a finite number, got inf", id="convert-lr-inf"),
    Case(CONVERT + "--ridge nan", "--ridge must be a finite number, got nan", id="convert-ridge-nan"),
    Case(CONVERT + "--layout auto --kv-saving inf --calib-data {model}/config.json",
         "--kv-saving must be a finite number, got inf", id="convert-kv-saving-inf"),
    # paths that are not UTF-8 text (undecodable bytes): refused before any work, not when the records are written
    Case("convert {model} {tmp}/o\udcffut -q", "is not valid UTF-8", id="convert-out-not-utf8"),
    Case(CONVERT + "--calib-data {tmp}/c\udcff.txt", "is not valid UTF-8 (a file name with undecodable bytes)",
         id="convert-calib-not-utf8"),
    Case("report {report} -o {tmp}/r\udcffep -q", "is not valid UTF-8", id="report-out-not-utf8"),
    Case(CONVERT + "--calib-data {data}", "is not valid UTF-8", undecodable_txt, id="convert-calib-folder-not-utf8"),
    Case(EVAL + "--seq-len 1.5", "argument --seq-len: invalid int value: '1.5'; see `clakit eval --help`"),
    Case("report -o {tmp}/rep", "the following arguments are required: REPORT.json"),
    Case(UP + "data.seq_len=100000", "data.eval_max_tokens (128) must be at least data.seq_len (100000), one "
         "held-out window; raise data.eval_max_tokens or lower data.seq_len", id="uptrain-seq-len-over-eval-tokens"),
    Case(UP + "bogus", "unrecognized argument 'bogus'; overrides look like train.max_steps=10"),
    Case(UP + "--bogus", "unrecognized argument '--bogus'"),
    Case("demo --max-tokens lots", "argument --max-tokens: invalid int value: 'lots'"),
]  # fmt: skip


@pytest.fixture(scope="module")
def eval_report(tmp_path_factory, tokenizer) -> Path:
    """A real clakit eval report of a tiny in-memory model (with speed, so its fields are checked too)."""
    path = tmp_path_factory.mktemp("report") / "orig.json"
    kwargs = dict(tokenizer=tokenizer, text=make_text(400, 21), batch_size=2, decode_steps=2, quiet=True)
    return write_json(evaluate(tiny_model("llama"), seq_len=32, name="orig", **kwargs), path)


@pytest.fixture
def paths(tmp_path, tiny_llama_checkpoint, tiny_cla_checkpoint, corpus_dir, eval_report) -> dict:  # noqa: F811
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.txt", "heldout.txt"):
        shutil.copy(corpus_dir / name, data / name)
    recipe = tiny_recipe(data, tmp_path / "run", model={"path": str(tiny_cla_checkpoint)})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return {
        "tmp": tmp_path,
        "model": shutil.copytree(tiny_llama_checkpoint, tmp_path / "model"),
        "cla": tiny_cla_checkpoint,
        "data": data,
        "recipe": tmp_path / "recipe.yaml",
        "report": shutil.copy(eval_report, tmp_path / "orig.json"),
    }


@pytest.mark.parametrize("case", CASES, ids=str)
def test_refused(case, paths, tmp_path, tiny_cla_checkpoint):  # noqa: F811
    check(case, paths, watch=[tmp_path, tiny_cla_checkpoint])


def test_the_reports_read_back_are_valid(paths):
    """The table's damaged reports differ from a report that `clakit report` accepts by one field only."""
    run = run_clakit("report", paths["report"], paths["report"], "-o", paths["tmp"] / "rep", "-q")
    assert run.code == 0 and run.err == "", run.err
    assert (paths["tmp"] / "rep" / "report.html").is_file()
