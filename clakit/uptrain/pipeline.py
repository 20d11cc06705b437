"""`clakit uptrain`: recipe -> checks -> (convert) -> LoRA/distillation training -> merged CLA checkpoint + card.

Run folder (train.output_dir):
  recipe.yaml, run.json   the resolved recipe and its fingerprint (resume refuses a different recipe)
  converted/              the on-the-fly conversion of model.source (absent with model.path)
  checkpoints/            resumable training state (see checkpoint.py)
  metrics.jsonl           one line per logging step / evaluation
  eval/*.json, report/    `clakit eval` reports of the original, converted and uptrained models, and their page
  model/                  the result: LoRA merged, a CLA checkpoint loadable with trust_remote_code
A fresh run is prepared in a unique hidden `.NAME.XXXXXXXX.partial` folder beside it and renamed into place only once
conversion, data and models are ready, so bad input leaves nothing behind; a run that fails before its first
checkpoint is removed again. --overwrite replaces only a clakit uptrain run (clakit.outputs: the ownership rule).
"""

import contextlib
import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import torch

from clakit import devices, outputs
from clakit.convert.layerwise import resolve_device
from clakit.corpus import is_datasets_spec
from clakit.errors import ClakitError
from clakit.paths import expand
from clakit.provenance import CONVERT_RECORD, UPTRAIN_RECORD
from clakit.sources import (
    check_weights,
    load_config,
    load_model,
    load_tokenizer,
    looks_like_hub_id,
    progress_bars_off,
    resolve_source,
)
from clakit.uptrain import card, checkpoint, sharding, student
from clakit.uptrain.distill import check_same_tokenizer, check_stock, check_teacher_fits, load_teacher
from clakit.uptrain.packing import build_data
from clakit.uptrain.recipe import (
    MODEL_READ_FLAGS,
    MODEL_RUN_ONLY,
    RUN_ONLY,
    Recipe,
    identity,
    load_recipe,
    located_text,
    resolve_recipe,
    shipped_recipes,
)
from clakit.uptrain.trainer import (
    METRICS,
    LossNotFinite,
    StepShape,
    Trainer,
    blocks_per_step,
    check_plan,
    drop_metrics_after,
    make_plan,
    step_shape,
)

RESULT = outputs.RUN_MODEL  # one name: outputs.run_model_hint names it for commands below uptrain
# how long a process waits in a collective while the main one works alone: reading a 70B checkpoint before the
# weights are broadcast, writing the merged result at the end (accelerate's default is 10 minutes on NCCL)
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)
EVAL = "eval"  # clakit eval reports: original.json, converted.json, uptrained.json
REPORTS = ("original", "converted", "uptrained")  # in the report page's order; the first two written at the start
# what a run adds to its folder after it is published (its marker lists them: see clakit.outputs)
RUN_FILES = ("checkpoints", "metrics.jsonl", RESULT, "report", EVAL, "tensorboard")


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(f"clakit uptrain: {message}", file=sys.stderr, flush=True)


# --- checks that run before anything is written -----------------------------------------------------------------


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def check_output_dir(
    out: Path, recipe: Recipe, resume: bool, overwrite: bool, recipe_path: Path | None = None
) -> None:
    if resume and overwrite:
        raise ClakitError("--resume and --overwrite contradict each other; give one")
    if resume:
        _check_resumable(out, recipe)
        return
    outputs.check_not_inside_an_output(out, "train.output_dir")
    check_outside_shipped(out)
    outputs.check_folder(
        out,
        "uptrain",
        overwrite=overwrite,
        inputs=run_inputs(recipe, recipe_path),
        label="train.output_dir",
        replace_hint=_replace_hint(out),
        # the other processes of a launch: the main one makes the run's staging folder, maybe before they get here
        # (NCCL's process group does not wait for every rank at its start)
        live_writers=_main_rank(),
    )


def finished(out: Path) -> bool:
    """Whether the run in `out` has written its result (nothing is left for --resume to do)."""
    return (out / RESULT / "config.json").is_file()


def _replace_hint(out: Path) -> str:
    """The fix for an existing run folder: a finished run cannot be continued, only kept (another folder) or
    replaced; an unfinished one continues with --resume."""
    if finished(out):
        return (
            f"its run has finished (its model is {out / RESULT}), so --resume has nothing left to do: "
            "replace it with --overwrite"
        )
    return "continue it with --resume or replace it with --overwrite"


def _no_run_fix(out: Path) -> str:
    """What starts a run in `out`, which holds none: dropping --resume only where it is missing or empty (a folder of
    other files is refused then, and an uptrain folder without its run.json asks for --resume again)."""
    if not out.is_dir() or not any(out.iterdir()):
        return "drop --resume to start one there"
    if outputs.owner(out) == "uptrain":
        return "start it over with --overwrite"
    return "choose another train.output_dir"


def _check_resumable(out: Path, recipe: Recipe) -> None:
    # first: another process staging a run for this output_dir (a fresh one, or --overwrite after hours of
    # conversion): resumed now, this run held the folder and that one lost all its work at its publish
    # what a killed --overwrite left (its run never checkpointed: the old run is put back) reclaimed first
    outputs.clear_leftovers(out, "--resume: train.output_dir")
    if not (out / "run.json").is_file():
        raise ClakitError(f"--resume: {out} holds no clakit uptrain run; {_no_run_fix(out)}")
    # the main process only: it holds the run from here on (_uptrain), and another process of this launch, a moment
    # later here, took that hold for another run's
    if _main_rank() and outputs.in_use(out):
        raise ClakitError(f"--resume: the run in {out} is still running in another process; wait for it to end")
    run = json.loads((out / "run.json").read_text())
    if run.get("fingerprint") == recipe.fingerprint():
        return
    started, now = _recorded_identity(run), identity(recipe.to_dict())
    if started == now:  # an older record: its fingerprint hashed the paths as typed, or lacks a key added since
        return
    changes = _diff(started or run.get("recipe", {}), now)
    # may change: not part of the fingerprint
    ignored = tuple(f"train.{key}:" for key in RUN_ONLY) + tuple(f"model.{key}:" for key in MODEL_RUN_ONLY)
    shown = "; ".join(c for c in changes if not c.startswith(ignored))[:300] or "unknown fields"
    if finished(out):  # a finished run is not continued with any recipe
        raise ClakitError(
            f"--resume: the run in {out} has finished (its model is {out / RESULT}) with a different recipe "
            f"({shown}); choose another train.output_dir for the new recipe, or replace the run with --overwrite"
        )
    raise ClakitError(
        f"--resume: the run in {out} was started with a different recipe ({shown}); "
        "resume with the same recipe and overrides, or start over with --overwrite"
    )


def _recorded_identity(run: dict) -> dict | None:
    """The recipe run.json recorded, as identity() keeps it, its keys through Recipe.from_record (a key added since
    takes its default, as the recorded run had it); None for a record without one."""
    if not isinstance(run.get("recipe"), dict):
        return None
    try:
        return identity(Recipe.from_record(run["recipe"]).to_dict())
    except ClakitError:  # a key this clakit does not know: compared as recorded
        return identity(run["recipe"])


def run_inputs(recipe: Recipe, recipe_path: Path | None) -> list[tuple[str, object]]:
    """What train.output_dir must neither contain nor be inside: --overwrite would delete it."""
    m = recipe.model
    return [
        ("model", [m.path, m.source]),
        ("teacher", student.original_spec(m, fetch=False) if m.path or m.source else None),
        ("training data", recipe.data.train),
        ("held-out data", recipe.data.eval),
        ("calibration data", m.convert.calib_data if m.convert else None),
        ("recipe", recipe_path),
    ]


def check_tensorboard(train) -> None:
    if "tensorboard" in train.report_to:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise ClakitError(
                "train.report_to asks for tensorboard, which is not installed: pip install tensorboard "
                "(or clakit[tensorboard]), or set train.report_to=none"
            )


def check_teacher(recipe: Recipe, out: Path, resume: bool):
    """The original model, resolved once: the teacher (required with distillation: known from model.original,
    model.source or the conversion record, and resolvable) and the "original" eval baseline (best effort, except
    for a local model.original, which must be a model: check_original).

    Returns its Source (absolute local path, or the Hub id's snapshot and revision) or None. A resumed run uses the
    teacher its run.json recorded, whatever the working directory is now."""
    if resume:
        recorded = _recorded_original(out) if recipe.needs_teacher else None
        if recorded or not recipe.needs_teacher:  # a resumed run has its baseline report already
            return recorded and resolve_source(recorded["path"], None, recipe.model.allow_pickle)
    check_original(recipe.model.original)
    found = student.original_source(recipe.model)
    if found is None and recipe.needs_teacher:
        raise ClakitError(
            "distillation needs the original model as teacher: set model.original to the model that "
            f"{recipe.model.path} was converted from"
        )
    given_here = recipe.model.original and expand(recipe.model.original, "model.original").exists()
    if given_here and not recipe.needs_teacher:  # the baseline report: a local model.original must be a stock model
        source = resolve_source(*found, recipe.model.allow_pickle)
        # as the baseline, a CLA model would compare CLA against CLA
        check_stock(source, "model.original", recipe.model.trust_remote_code)
        return source
    if found is None or recipe.needs_teacher:
        check_recorded_original(recipe.model, found)
        return found and resolve_source(*found, recipe.model.allow_pickle)
    try:
        return resolve_source(*found, recipe.model.allow_pickle)
    except ClakitError:  # without distillation it is only the baseline report: a moved original costs just that
        return None


def check_recorded_original(model, found: tuple[str, str | None] | None) -> None:
    """A teacher read from model.path's records (neither model.original nor model.source given) whose local path is
    gone (the original moved after the conversion): refused naming the record and the fix. resolve_source named a
    path the user never typed, with "give a checkpoint folder", and --dry-run passed it."""
    if model.original or model.source or found is None or found[1] is not None:
        return
    spec = found[0]
    if expand(spec, "model").exists() or (looks_like_hub_id(spec) and not Path(spec).is_absolute()):
        return
    folder = expand(model.path, "model.path")
    if folder.is_dir():  # a Hub id's records were read from its snapshot: named as either
        record = CONVERT_RECORD if (folder / CONVERT_RECORD).is_file() else UPTRAIN_RECORD
    else:
        record = f"{CONVERT_RECORD} or {UPTRAIN_RECORD}"
    raise ClakitError(
        f"the original model {model.path} was made from ({spec}, as its {record} records) does not exist here "
        "(moved, or made on another machine); set model.original to where that stock model is"
    )


def check_original(spec: str | None) -> None:
    """model.original as a local path must exist even when nothing distils: it is also the "original" baseline
    report and the provenance in run.json, which a typo'd path silently lost. A Hub id (org/name, as resolve_source
    reads it) is not looked up here: without distillation it stays best effort (offline: no baseline)."""
    if spec and not looks_like_hub_id(spec) and not expand(spec, "model").exists():
        raise ClakitError(
            f"model.original {spec} does not exist; give the checkpoint folder or .gguf file the model was "
            "converted from, or a Hub id (org/name), or drop model.original"
        )


def run_record(out: Path) -> dict | None:
    """The run folder's run.json, None when absent; unreadable or not a clakit record is one line naming it."""
    path = out / "run.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        record = e
    if not isinstance(record, dict) or not isinstance(record.get("fingerprint"), str):
        raise ClakitError(
            f"--resume: {path} is unreadable or not a clakit run record; the run cannot be continued, start it "
            "over with --overwrite or in another train.output_dir"
        )
    return record


def data_digest(data) -> str:
    """sha256 of the packed train and held-out blocks: what a resumed run must read again to continue exactly."""
    import hashlib

    digest = hashlib.sha256()
    for blocks in (data.train, data.eval):
        digest.update(blocks.numpy().tobytes())
    return digest.hexdigest()


def check_same_data(out: Path, digest: str, recipe: Recipe) -> None:
    """--resume: the batch order is a function of the step and the blocks, so text edited (or a tokenizer changed)
    since the run started would silently train on other data; refused. The text is its tokens, wherever its files
    are now (data paths are outside the fingerprint: recipe.identity), read to the budget it started with on any
    number of processes (`run_shape`). A run.json without the digest, or without the processes it started on (which
    that budget needs), has the files compared instead, as resolved from the folder each recipe was typed in.
    `digest`: data_digest of the blocks read now."""
    record = run_record(out) or {}
    recorded = record.get("data_sha256")
    if recorded and record.get("data_processes"):
        if recorded != digest:
            raise ClakitError(
                f"--resume: the training or held-out text changed since the run in {out} started (its tokens "
                "differ), so it cannot continue exactly; restore the text, or start over with --overwrite"
            )
        return
    _check_same_files(out, record, recipe)


def _check_same_files(out: Path, record: dict, recipe: Recipe) -> None:
    """The data files of the recorded recipe (from its provenance.cwd; as typed without one) against the given."""
    cwd = (record.get("provenance") or {}).get("cwd")
    started = located_text(record.get("recipe") or {}, cwd if isinstance(cwd, str) else None)
    now = located_text(recipe.to_dict(), os.getcwd() if isinstance(cwd, str) else None)
    changed = [f"{key}: {started[key]!r} -> {now[key]!r}" for key in started if started[key] != now[key]]
    if changed:
        raise ClakitError(
            f"--resume: the run in {out} read other files ({'; '.join(changed)[:300]}), and their tokens cannot be "
            "compared here (its run.json, from an earlier clakit, records none); give the files it read, or start "
            "over with --overwrite"
        )


def _recorded_original(out: Path) -> dict | None:
    original = (run_record(out) or {}).get("original")
    return original if isinstance(original, dict) and original.get("path") else None


def _source_record(source) -> dict | None:
    """run.json's and uptrain.json's `original`: its spec, the path read and, for a Hub id, the commit read (the
    revision asked, "main", moves: a later run from this model whose snapshot had left the cache distilled from
    whatever main was then, without a word)."""
    return source and {"spec": source.spec, "path": str(source.path), "revision": source.commit or source.revision}


def check_paths(recipe: Recipe) -> None:
    """Cheap existence checks for --dry-run: local model/data paths (datasets specs and Hub ids are not fetched)."""
    for key in ("path", "source", "original"):
        spec = getattr(recipe.model, key)
        if spec and (expand(spec, f"model.{key}").exists() or looks_like_hub_id(spec)):  # as resolve_source judges it
            continue
        if spec:
            raise ClakitError(
                f"model.{key} {spec!r} does not exist; give a checkpoint folder, a .gguf file or a Hub id"
            )
    convert = recipe.model.convert
    for key, spec in recipe.keyed_text_specs():  # the conversion's text too
        if not expand(spec, key).exists() and not is_datasets_spec(spec):
            raise ClakitError(f"{key} {spec!r} does not exist; give text files, .txt folders or NAME:CONFIG:SPLIT")
    try:  # a GPU this machine lacks, or bf16 fits on the CPU, as the conversion would refuse them
        if convert:
            resolve_device(convert.device, convert.dtype)
    except ClakitError as e:
        raise student.in_recipe(e) from None


def check_local_model(recipe: Recipe):
    """--dry-run: what the run checks first from a local model's config (its kind, its window against data.seq_len,
    the LoRA patterns against its layout or the one model.convert will write); reads config.json or a GGUF's
    metadata, no weights. A Hub id is not fetched. Returns its config, or None for a Hub id."""
    model = recipe.model
    if expand(model.path or model.source, "model").exists():
        return check_student(model, recipe)
    return None


def check_local_teacher(recipe: Recipe, out: Path, student_config) -> None:
    """--dry-run: the teacher / baseline checks the run makes before any work (one is needed with distillation; its
    shapes fit the student's; a local model.original is a stock model), where the student and the original are
    local (a Hub id is not fetched): --dry-run passed a missing teacher, or one of 5 layers for a 4-layer student."""
    found = student.original_source(recipe.model, fetch=False)
    if recipe.needs_teacher:
        check_recorded_original(recipe.model, found)
    if student_config is None or (found is not None and not expand(found[0], "model").exists()):
        return
    check_fitting_teacher(recipe, out, False, student_config, recipe.model.trust_remote_code)


def check_fitting_teacher(recipe: Recipe, out: Path, resume: bool, student_config, trust_remote_code: bool):
    """The teacher or baseline (check_teacher), its shapes checked against the student's: one rule for the run and
    --dry-run. Returns its Source or None."""
    original = check_teacher(recipe, out, resume)
    if original is not None:  # the teacher, or only the "original" baseline
        check_teacher_fits(original, student_config, recipe.needs_teacher, trust_remote_code)
    return original


def check_student(model, recipe: Recipe):
    """The model section's config, checked (its kind, its window against data.seq_len, the LoRA patterns against its
    layout or the one model.convert will write): one rule for the run and --dry-run (check_local_model)."""
    config = student.check_model_section(model, recipe.data.seq_len)
    student.check_patterns(config, recipe.lora, student.planned_layout(model, config))
    return config


# --- the run --------------------------------------------------------------------------------------------------------


def make_accelerator(train, project_dir: Path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs, set_seed

    # accelerate keeps its settings in a process-wide singleton: a second run in one process (a notebook, the
    # tests) with another mixed precision would be refused. The process group (PartialState) is kept.
    launched = launched_processes()  # before accelerate reads it
    AcceleratorState._reset_state(reset_partial_state=False)
    log_with = ["tensorboard"] if "tensorboard" in train.report_to else None
    acc = Accelerator(
        mixed_precision="bf16" if train.bf16 else "no",
        log_with=log_with,
        project_dir=str(project_dir),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT)],
    )
    if launched > acc.num_processes:
        # torchrun on CPU without ACCELERATE_USE_CPU: every process would run the whole job alone, in one folder
        raise ClakitError(
            f"launched as {launched} processes but accelerate sees {acc.num_processes}; on CPU run "
            f"`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node {launched} -m clakit uptrain ...`, "
            "on GPUs `accelerate launch ...`"
        )
    check_fsdp(acc)
    fp32_buffers(acc)
    set_seed(train.seed)
    return acc


def launched_processes() -> int:
    """WORLD_SIZE as torchrun and accelerate set it (1 when unset); a value that is no count (a typo, an empty
    export) was a ValueError traceback."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ClakitError(
            f"WORLD_SIZE={value!r} is not a number of processes; unset it, or launch with torchrun or accelerate"
        ) from None


def fp32_buffers(acc) -> None:
    """FSDP1's mixed precision as accelerate sets it casts buffers to bf16 too: RoPE's inv_freq (fp32 in the teacher
    and in the saved checkpoint) would be rounded (2e-3 relative: radians of phase at positions in the thousands)
    in the student it trains and scores. Buffers stay fp32; parameters and reductions keep the user's settings."""
    plugin = checkpoint.fsdp_plugin(acc)
    policy = getattr(plugin, "mixed_precision_policy", None)
    if getattr(plugin, "fsdp_version", 1) == 1 and getattr(policy, "buffer_dtype", None) not in (None, torch.float32):
        plugin.mixed_precision_policy = dataclasses.replace(policy, buffer_dtype=torch.float32)


FSDP_MIN_TORCH = {1: "2.7", 2: "2.9"}  # by fsdp_version, measured on 2 CPU processes with gloo (docs/install.md)


def check_fsdp(acc) -> None:
    """FSDP1 flattens each wrapped layer into one tensor, which cannot mix frozen and trainable parameters (LoRA's
    are always mixed) unless it keeps the original parameters. FSDP on CPU processes below the torch of
    FSDP_MIN_TORCH: check_fsdp_torch."""
    plugin = checkpoint.fsdp_plugin(acc)
    if plugin is None:
        return
    version = getattr(plugin, "fsdp_version", 1)
    check_fsdp_torch(acc, version or 1)
    if version == 1 and not plugin.use_orig_params:
        raise ClakitError(
            "FSDP (version 1) without use_orig_params cannot train LoRA (each layer mixes frozen and trained "
            "tensors); set fsdp_use_orig_params: true in the accelerate config (FSDP_USE_ORIG_PARAMS=true), "
            "or use fsdp_version: 2"
        )


def check_fsdp_torch(acc, version: int) -> None:
    """Below the torch of FSDP_MIN_TORCH (clakit's floor is 2.6) FSDP on CPU processes failed (2.6:
    Stream.record_event, absent on the CPU) or FSDP2 trained other weights than one process (2.7, 2.8: 3.6e-4 off,
    where training moved them ~5e-3): refused there, not trained wrongly. On GPUs FSDP was not run below 2.13, so
    nothing measured refuses it there (docs/install.md)."""
    from packaging.version import Version

    need = FSDP_MIN_TORCH[version]
    if Version(torch.__version__).release < Version(need).release and acc.device.type == "cpu":
        raise ClakitError(
            f"FSDP{version} on CPU processes needs torch>={need} (found {torch.__version__}; older ones failed or "
            f'trained other weights than one process): pip install "torch>={need}", or train without FSDP'
        )


def check_fsdp_wrap(acc, config) -> None:
    """FSDP's transformer-based wrap shards the classes it names one by one; the student's decoder layers are the CLA
    classes (LlamaCLADecoderLayer), not the stock ones an accelerate config written for Llama names, and accelerate
    would fail on that only after the models are loaded."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = checkpoint.fsdp_plugin(acc)
    policy = getattr(plugin, "auto_wrap_policy", None)
    names = getattr(plugin, "transformer_cls_names_to_wrap", None) or []
    if getattr(policy, "func", policy) is not transformer_auto_wrap_policy or not names:
        return
    model = student.meta_student(config)
    present = {type(m).__name__ for m in model.modules()}
    missing = [n for n in names if n not in present]
    if missing:
        layer = type(model.get_decoder().layers[0]).__name__
        raise ClakitError(
            f"FSDP's transformer_cls_to_wrap names {missing[0]}, which the CLA student does not have (its decoder "
            f"layers are {layer}); set --fsdp_transformer_layer_cls_to_wrap {layer} (in the accelerate config: "
            "fsdp_transformer_layer_cls_to_wrap), or leave it unset"
        )


def check_launch(data, world: int) -> None:
    """Every process needs at least one train block per step and one held-out block to score."""
    for what, n, fix in (
        ("train", len(data.train), "give more data.train text"),
        ("held-out", len(data.eval), "raise data.eval_max_tokens or give more held-out text"),
    ):
        if world > n:
            raise ClakitError(
                f"launched on {world} processes but the {what} data has only {n} blocks of data.seq_len="
                f"{data.seq_len}; launch at most {n} processes, {fix}, or lower data.seq_len"
            )


def check_step_fits_data(data, shape: StepShape) -> None:
    """One optimizer step may not read more blocks than the training data holds: it would count blocks twice in one
    gradient, and a huge gradient_accumulation_steps would run its first step practically forever."""
    per_step, world = shape.blocks, shape.world
    if per_step > len(data.train):
        raise ClakitError(
            f"one optimizer step reads train.per_device_train_batch_size x train.gradient_accumulation_steps x "
            f"{world} process(es) = {per_step} blocks of data.seq_len={data.seq_len}, but data.train has only "
            f"{len(data.train)}: each step would read blocks twice; lower train.gradient_accumulation_steps or "
            "train.per_device_train_batch_size, give more data.train text, or lower data.seq_len"
        )


MIN_TOKENISED = 1 << 24  # below this the whole train text is read: the run samples from all of it


def token_budget(train, seq_len: int, shape: StepShape) -> int | None:
    """How much train text to tokenise: all of it, unless it is far more than the run will read (a large datasets
    spec); then twice the run's token budget, so memory stays bounded. None: read everything. A resume reads to the
    same budget on any number of processes (its steps keep their blocks: `run_shape`)."""
    per_step = shape.blocks * seq_len
    if train.max_steps > 0:
        return max(MIN_TOKENISED, 2 * train.max_steps * per_step)
    return max(MIN_TOKENISED, 2 * (train.max_tokens + per_step)) if train.max_tokens else None


def _model_spec(model) -> str:
    return model.path or model.source


def resumed_model(recipe: Recipe, out: Path):
    """--resume: the model section to load the student from. model.path as the recipe spells it may now name another
    checkpoint (a relative path from another working directory, a Hub id whose branch moved) and the saved LoRA
    would be merged into weights it was never trained on: the checkpoint run.json recorded is used, as for the
    teacher; with model.source the conversion in the run folder is. A model key or calib_data typed otherwise than
    run.json recorded it is refused where it names other weights or text than the run read (outside the fingerprint,
    so that a moved project resumes)."""
    record = run_record(out) or {}
    _check_same_original(out, record, recipe.model)
    _check_same_calibration(out, record, recipe.model)
    recorded = record.get("start_checkpoint")
    if not recipe.model.path or not isinstance(recorded, str):  # runs recorded before start_checkpoint: as typed
        return recipe.model
    start = out / recorded  # an absolute record stays itself
    if not (start / "config.json").is_file():
        raise ClakitError(
            f"--resume: the run in {out} started from {start}, which is gone; put the checkpoint back there, or "
            "start over with --overwrite"
        )
    summary = record.get("start_summary")  # runs recorded before it: not compared
    if isinstance(summary, str) and checkpoint_summary(start) != summary:  # e.g. `clakit convert ... --overwrite`
        raise ClakitError(
            f"--resume: the run in {out} started from {start}, whose config or weights have changed since (another "
            "model written there?): the saved training belongs to the one it read; put that checkpoint back there, "
            "or start over with --overwrite"
        )
    typed = ((record.get("recipe") or {}).get("model") or {}).get("path")
    if recipe.model.path != typed:  # typed as recorded: the run's own, from whatever folder (the docstring)
        _check_same_checkpoint(out, start, expand(recipe.model.path, "model.path"), "model.path")
    return dataclasses.replace(recipe.model, path=str(start), revision=None)  # resolved already: no revision


def _check_same_original(out: Path, record: dict, model) -> None:
    """model.source / model.original typed otherwise than run.json recorded them, against the original the run
    resolved (the conversion in the run folder and the teacher come from it, whatever the recipe names now)."""
    typed = (record.get("recipe") or {}).get("model") or {}
    given, key = (model.original, "model.original") if model.original else (model.source, "model.source")
    recorded = (record.get("original") or {}).get("path")
    if given and given != (typed.get("original") or typed.get("source")) and isinstance(recorded, str):
        _check_same_checkpoint(out, Path(recorded), expand(given, key), key)


def _check_same_calibration(out: Path, record: dict, model) -> None:
    """model.convert.calib_data typed otherwise than run.json recorded it, against the text the run's conversion read
    (its calib_sha256; the conversion in the run folder is used, whatever the recipe names now). A datasets spec is
    not read again (offline)."""
    from clakit.corpus import load_texts, texts_sha256

    typed = (((record.get("recipe") or {}).get("model") or {}).get("convert") or {}).get("calib_data")
    given = model.convert.calib_data if model.source and model.convert else None
    settings = (card.conversion_record(out / "converted") or {}).get("settings")
    recorded = settings.get("calib_sha256") if isinstance(settings, dict) else None  # none: nothing to compare
    if not given or given == typed or not recorded or any(is_datasets_spec(spec) for spec in given):
        return
    if texts_sha256(load_texts(given, "model.convert.calib_data")) != recorded:
        raise ClakitError(
            f"--resume: the run in {out} converted its model calibrated on other text than model.convert.calib_data "
            f"now names ({', '.join(given)}); give the text it read, or start over with --overwrite"
        )


def _check_same_checkpoint(out: Path, recorded: Path, given: Path, key: str) -> None:
    """The model keys are outside the fingerprint (a moved project resumes: recipe.identity), so a local `key`
    naming another checkpoint than the one the run read is refused here: the saved LoRA (and the run's conversion)
    belong to the recorded one. A copy or a moved folder is the same checkpoint (checkpoint_summary); a Hub id, or
    a recorded folder that is gone, is not compared (offline; the run reads its own)."""
    if not (given / "config.json").is_file() or not (recorded / "config.json").is_file():
        return
    if given.resolve() != recorded.resolve() and checkpoint_summary(given) != checkpoint_summary(recorded):
        raise ClakitError(
            f"--resume: the run in {out} started from {recorded}; {key} now names {given}, another checkpoint "
            "(its config or weights differ): give the one it started from, or start over with --overwrite"
        )


SUMMARY_BYTES = 1 << 20  # of each weight file's start and end: a fine-tune with the same shapes differs there


def checkpoint_summary(folder: Path) -> str:
    """sha256 of a checkpoint's config.json (as parsed) and, per weight file, its name, size and first and last MiB:
    equal for a copy, unequal for another model or fine-tune, without reading 140 GB of a 70B's weights."""
    import hashlib

    digest = hashlib.sha256(json.dumps(json.loads((folder / "config.json").read_text()), sort_keys=True).encode())
    for path in sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")):
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as f:
            digest.update(f.read(SUMMARY_BYTES))
            f.seek(max(size - SUMMARY_BYTES, 0))
            digest.update(f.read(SUMMARY_BYTES))
    return digest.hexdigest()


CONVERT_POLL_S = 10.0  # how often the other processes look for the converted checkpoint


def prepare_student_checkpoint(recipe: Recipe, work: Path, acc, quiet: bool, model=None, out=None) -> Path:
    """The CLA checkpoint to train: model.path, or model.source converted by the main process into work/converted.

    The other processes do not wait in a collective (whose timeout, COLLECTIVE_TIMEOUT, a big conversion outlasts):
    they poll the file system for the published folder, or for the failure note the main process leaves. `model`:
    the model section to read (resumed_model), default recipe.model; `out`: where `work` is published (messages
    name the folder the user will find, not the hidden staging folder)."""
    model = model or recipe.model
    if model.path:
        return resolve_source(model.path, model.revision, model.allow_pickle).path
    converted, failed = work / "converted", work / "converted.failed"
    if acc.is_main_process and not (converted / "config.json").is_file():
        shown = (out or work) / "converted"
        _say(f"converting {recipe.model.source} into {shown}", quiet)
        try:
            student.convert_source(recipe.model, converted, quiet=quiet, shown=shown)
        except BaseException as e:
            failed.write_text(f"{type(e).__name__}: {e}"[:500])
            raise
    elif not acc.is_main_process:
        wait_for_conversion(converted, failed)
    acc.wait_for_everyone()  # everyone is here already: no long wait
    return converted


def wait_for_conversion(converted: Path, failed: Path, poll_s: float | None = None) -> None:
    """Block until the main process publishes `converted` (its config.json appears with the atomic rename) or
    writes `failed`; the conversion's duration does not matter."""
    import time

    while not (converted / "config.json").is_file():
        if failed.is_file() or not converted.parent.is_dir():  # the note, or the run folder already cleaned up
            why = failed.read_text()[:300] if failed.is_file() else "its run folder is gone"
            raise ClakitError(f"the main process failed converting model.source ({why})")
        time.sleep(CONVERT_POLL_S if poll_s is None else poll_s)


def heldout_report(model, name: str, recipe: Recipe, data, tokenizer, quiet: bool) -> dict:
    """`clakit eval`'s report of an in-memory model on the held-out data (no speed test: CPU time is precious)."""
    from clakit.eval import evaluate

    source = {"data": recipe.data.eval} if recipe.data.eval else {"text": _heldout_text(data.eval, tokenizer)}
    return evaluate(
        model,
        tokenizer=tokenizer,
        seq_len=recipe.data.seq_len,
        max_tokens=recipe.data.eval_max_tokens,
        batch_size=recipe.train.per_device_eval_batch_size,
        speed=False,
        quiet=quiet,
        name=name,
        **source,
    )


def _heldout_text(blocks: torch.Tensor, tokenizer) -> str:
    """The held-out tail's text from its packed blocks ((n, seq_len) ids: BOS doc EOS ...), its documents joined as
    eval joins files (SEPARATOR; evaluate puts its own BOS before the text). Decoded whole, each EOS was the literal
    "<|endoftext|>" in the text: counted as 13 bytes of text in bits per byte, and read back as the EOS token."""
    from clakit.corpus import SEPARATOR
    from clakit.uptrain.packing import document_start

    ids, eos = blocks.flatten(), tokenizer.eos_token_id
    ends = (ids == eos).nonzero().flatten().tolist() if eos is not None else []  # no EOS: SEPARATOR's tokens are in
    docs = [ids[a + 1 : b] for a, b in zip([-1, *ends], [*ends, len(ids)], strict=True)]
    bos = torch.tensor(document_start(tokenizer), dtype=ids.dtype)  # split first: a BOS that is also the EOS
    docs = [d[~torch.isin(d, bos)] for d in docs]
    return SEPARATOR.join(tokenizer.decode(d) for d in docs if len(d))


def with_origin(report: dict, model_dir: Path, published: Path | None = None) -> dict:
    """`report` (of an in-memory model: evaluate cannot tell where its weights came from, its origin is null) with
    the provenance.origin of the checkpoint folder the model was read from or written to (the conversion's, an
    earlier uptraining's, this run's uptrain.json), as `clakit eval` of that folder records it; the report page's
    "made from" reads it. `published`: where that folder will be once the run or the model is renamed into place
    (the record's path as it will be found; its sha256 is of the same bytes)."""
    from clakit.eval.lineage import origin

    found = origin(model_dir)
    if found is not None and published is not None:
        found["record"] = str(published / Path(found["record"]).name)
    report["provenance"]["origin"] = found
    return report


def _published(path: Path, work: Path, out: Path | None) -> Path | None:
    """Where `path` inside the staging folder `work` will be once the run is published in `out` (None: it stays)."""
    return out / path.relative_to(work) if out is not None and path.is_relative_to(work) and work != out else None


def original_report(recipe: Recipe, source, teacher, dtype, run: dict, acc) -> dict | None:
    """The stock model's report: the teacher when there is one, else the original loaded just for this. Its
    provenance.model_path names the original (a report of an in-memory model names none: two runs' originals were
    one model given twice in `clakit report`)."""
    if teacher is None and source is None:
        return None
    model = teacher if teacher is not None else _load_original(recipe, source, dtype, acc)
    report = heldout_report(model, "original", recipe, run["data"], run["tokenizer"], run["quiet"])
    report["provenance"]["model_path"] = str(source.path) if source is not None else None
    del model
    gc.collect()  # FSDP2's modules hold reference cycles: its shards would stay on the device into training
    return report


def _load_original(recipe: Recipe, source, dtype, acc):
    load = student.code_settings(recipe.model)
    if checkpoint.sharded(acc):  # every process scores it in step: read by the main one, sharded over all
        return sharding.shard_frozen(sharding.load_on_main(source, dtype, acc, **load), acc)
    return load_model(source, dtype=dtype, device=str(acc.device), **load)


def _staging_dir(out: Path, acc) -> Path:
    """One unique hidden staging folder per run (never shared with another run on the same output_dir), made by
    the main process and shared with the others."""
    name = [outputs.make_staging(out).name if acc.is_main_process else None]
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(name)
    return out.parent / name[0]


def _publish(work: Path, out: Path, acc, overwrite: bool, run: dict) -> None:
    """Move the prepared run folder into place. An old run (--overwrite) is moved aside, and kept there until this
    one has something worth keeping (`_drop_replaced`: after its first checkpoint; without checkpoints, once its
    model is in place): a run stopped before (Ctrl-C, an error) puts it back (`_abandon`); it was removed at once,
    and both runs were lost. Every process first: the others may still be reading the student from `work` (a slower
    one loading work/converted found it renamed away, "cannot load ... Repo id must be in the form ...", exit 2)."""
    acc.wait_for_everyone()
    if acc.is_main_process:
        with outputs.os_errors(out):
            replaced = outputs.publish(work, out, "uptrain", overwrite=overwrite, later=RUN_FILES,
                                       label="train.output_dir", keep_replaced=True)  # fmt: skip
        run["replaced"] = (work, replaced)
    acc.wait_for_everyone()


def _drop_replaced(run: dict, out: Path) -> None:
    """The old run an --overwrite moved aside removed, once this one is worth keeping (the main process; once)."""
    if "replaced" in run:
        work, old = run.pop("replaced")
        outputs.drop_replaced(work, out, old)


def _abandon(out: Path, acc, error: BaseException, run: dict) -> None:
    """A fresh run failed after its folder was published: before its first checkpoint nothing in it is worth
    keeping (remove it: nothing half-written stays; the run an --overwrite moved aside is put back); after, keep it
    for --resume and say so. A run whose model is saved has finished: kept as it is (its error says so)."""
    if "replaced" in run:  # the main process, before its first checkpoint or model (_drop_replaced)
        work, old = run.pop("replaced")
        outputs.restore_replaced(work, out, old)
        return
    if finished(out):
        return
    if checkpoint.checkpoint_dirs(out):
        if isinstance(error, LossNotFinite):  # --resume would repeat the same steps into the same loss
            raise ClakitError(f"{error}; its earlier checkpoints are kept in {out}") from None
        if isinstance(error, ClakitError) and "--resume" not in str(error):
            raise ClakitError(f"{error}; the run is kept in {out}: continue it with --resume") from None
        return
    if acc.is_main_process and outputs.owner(out) == "uptrain":
        shutil.rmtree(out, ignore_errors=True)


def uptrain(
    recipe_path: str | Path,
    overrides: list[str] = (),
    *,
    dry_run: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
) -> Path:
    """Train a CLA model as the recipe says; returns the folder of the merged result (`OUTPUT_DIR/model`).

    dry_run validates and prints the resolved recipe; resume continues `train.output_dir` from its last checkpoint;
    overwrite replaces a previous run there.
    """
    if isinstance(overrides, str):  # iterated as characters: "override 't' must look like section.key=value"
        raise ClakitError(f"overrides is a list of section.key=value strings: give [{overrides!r}]")
    with _settings_named(), _global_rng_kept(), progress_bars_off(quiet):
        return _uptrain(recipe_path, overrides, dry_run, resume, overwrite, quiet)


@contextlib.contextmanager
def _global_rng_kept():
    """The run seeds (accelerate's set_seed: torch, CUDA, numpy, random) and draws from the process-wide generators;
    a library caller's own generators are handed back as they were, not reseeded to the recipe's seed."""
    import random

    import numpy as np

    states = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    # CUDA not initialised yet: its generators are seeded lazily, from the caller's last torch.manual_seed (the CPU
    # generator's initial seed); set_seed queued the recipe's seed in its place (or, on a GPU run, seeded and drew)
    lazy_seed = torch.initial_seed() if cuda is None else None
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        else:
            torch.cuda.manual_seed_all(lazy_seed)  # queued again while CUDA is not initialised: no device touched


# clakit.sources refuses a model that runs its own code, or pickle weights, naming the flags; `clakit uptrain` has
# them too, but they stand for recipe keys, which a recipe or a library call sets
SOURCE_FLAGS = {f"pass {flag}": f"set model.{key}=true ({flag})" for key, flag in MODEL_READ_FLAGS.items()}


@contextlib.contextmanager
def _settings_named():
    """A refusal naming another command's flag names the recipe key instead (the message is otherwise kept)."""
    try:
        yield
    except ClakitError as e:
        message = str(e)
        for flag, key in SOURCE_FLAGS.items():
            message = message.replace(flag, key)
        if message == str(e):
            raise
        raise ClakitError(message) from None


def check_outside_shipped(out: Path) -> None:
    """`cd recipes/smollm2 && clakit uptrain 135m_cla2_cpu.yaml` wrote runs/ beside the shipped recipes."""
    shipped = shipped_recipes().resolve()
    if out.is_relative_to(shipped):
        raise ClakitError(
            f"train.output_dir {out} is inside clakit's shipped recipes ({shipped}), where its recipe.yaml would be "
            "read by name as a shipped recipe (and packaged by a build); choose a folder outside it"
        )


def _uptrain(recipe_path, overrides, dry_run: bool, resume: bool, overwrite: bool, quiet: bool) -> Path:
    recipe = load_recipe(recipe_path, overrides)
    recipe_file = resolve_recipe(recipe_path)
    out = expand(recipe.train.output_dir, "train.output_dir").resolve()
    if dry_run:
        return _dry_run(recipe, out)
    if resume:
        run_record(out)  # a corrupt run.json is one line, before anything else reads it
    check_output_dir(out, recipe, resume, overwrite, recipe_file)
    # --resume holds the run from its check on (the main process): an --overwrite started while this one loads its
    # models is refused at its own check, not after its work at its publish
    with outputs.hold(out, "train.output_dir") if resume and _main_rank() else contextlib.nullcontext():
        return _resume_or_start(recipe, out, resume, overwrite, quiet)


def _main_rank() -> bool:
    """Whether this is the main process of a launch (or the only one), before the Accelerator exists."""
    return os.environ.get("RANK", "0") == "0"


def _resume_or_start(recipe: Recipe, out: Path, resume: bool, overwrite: bool, quiet: bool) -> Path:
    if resume and finished(out):
        _complete_report(out)
        _say(f"the run in {out} has finished already; its result is {out / RESULT}", quiet)
        return out / RESULT
    check_tensorboard(recipe.train)
    model, student_config, original = _check_models(recipe, out, resume)
    tokenizer = _student_tokenizer(model, original)
    acc = make_accelerator(recipe.train, out)
    slow = recipe.train.bf16 and devices.slow_on_cpu(torch.bfloat16, "train.bf16", acc.device)
    if slow:  # a note, not a refusal: the run is right, only slow
        _say(slow, quiet)
    check_fsdp_wrap(acc, student_config)
    data = _read_data(recipe, tokenizer, acc, out, resume, run_shape(recipe, out, resume, acc.num_processes))
    with outputs.new_parents_removed_on_failure(out):  # runs/a/b/out: a failed run leaves no empty runs/a/b
        return _stage_and_train(recipe, out, data, tokenizer, acc, quiet, resume, overwrite, original, model)


def _dry_run(recipe: Recipe, out: Path) -> Path:
    """--dry-run: the cheap checks (paths, a local model's config), then the resolved recipe on stdout."""
    check_paths(recipe)
    check_outside_shipped(out)  # as the run checks it (helper R2: --dry-run passed it)
    check_tensorboard(recipe.train)  # as the run checks it: --dry-run passed report_to tensorboard without it
    check_local_teacher(recipe, out, check_local_model(recipe))
    print(recipe.to_yaml(), end="")
    return out / RESULT


def _check_models(recipe: Recipe, out: Path, resume: bool):
    """(the model section to load the student from, its config, the original's Source or None): the student's
    config, the teacher or baseline (it fits, its weights may be read) and a resumed run's last checkpoint, all
    checked before any model is loaded."""
    model = resumed_model(recipe, out) if resume else recipe.model
    checked, converted = model, out / "converted"
    if resume and model.source and (converted / "config.json").is_file():
        # the run's conversion is done and is not run again (the run reads converted/): that checkpoint is checked,
        # not model.convert's settings, which must stay as run.json recorded them; a run started before convert
        # refused one of them (--bf16 where nothing runs on data) resumes
        checked = dataclasses.replace(model, path=str(converted), source=None, revision=None, convert=None)
    student_config = check_student(checked, recipe)
    original = check_fitting_teacher(recipe, out, resume, student_config, model.trust_remote_code)
    if original is not None:
        check_weights(original, model.allow_pickle)  # pickle refused now, not once the conversion has run
    last = checkpoint.checkpoint_dirs(out) if resume else []
    if last:  # a corrupt checkpoint is refused before any model is loaded
        checkpoint.read_checkpoint(last[-1])
    return model, student_config, original


def _student_tokenizer(model, original):
    """The student's tokenizer (model.source's, or the CLA checkpoint's), its weights checked first; the original
    must read text as the same token ids."""
    student_source = resolve_source(_model_spec(model), model.revision, model.allow_pickle)
    check_weights(student_source, model.allow_pickle)  # model.path's own weights too, before any work
    tokenizer = load_tokenizer(student_source, model.trust_remote_code)
    if original is not None and original.path != student_source.path:  # read with the student's token ids
        check_same_tokenizer(original, tokenizer, model.trust_remote_code)
    return tokenizer


def run_shape(recipe: Recipe, out: Path, resume: bool, world: int) -> StepShape:
    """The step on these `world` processes (`step_shape`): on --resume, the blocks a step read where the run started
    (run.json's data_processes, with the recipe's batch and accumulation, which the fingerprint holds fixed)."""
    started = (run_record(out) or {}).get("data_processes") if resume else None
    blocks = blocks_per_step(recipe.train, started) if type(started) is int and started > 0 else None
    return step_shape(recipe.train, world, blocks)


def _read_data(recipe: Recipe, tokenizer, acc, out: Path, resume: bool, shape: StepShape) -> tuple:
    """(the packed blocks, their data_digest, the step's `shape`): read to the run's token budget, checked against
    the processes and the plan, and on --resume against the blocks the run started with. The digest is computed
    once: run.json's, the resume check's and the result's (uptrain.json)."""
    budget = token_budget(recipe.train, recipe.data.seq_len, shape)
    calib = recipe.model.convert.calib_data if recipe.model.convert else None
    before = student.fitted_before(recipe.model)
    data = build_data(recipe.data, tokenizer, budget, seed=recipe.train.seed, calib=calib, before=before)
    check_launch(data, acc.num_processes)
    check_step_fits_data(data, shape)
    check_plan(recipe.train, make_plan(recipe.train, len(data.train), data.seq_len, shape))
    digest = data_digest(data)
    if resume:
        check_same_data(out, digest, recipe)
    return data, digest, shape


def _stage_and_train(recipe: Recipe, out: Path, data, tokenizer, acc, quiet, resume, overwrite, original, model):
    """Set the run up in a staging folder (a fresh run) or in `out` (--resume), publish it, train, save. `data`:
    (the packed blocks, their data_digest)."""
    work = out if resume else _staging_dir(out, acc)
    try:
        fresh = not resume
        with outputs.os_errors(out):  # a full disk while writing recipe.yaml, run.json, eval/: one line
            run = _setup(
                recipe, work, data, tokenizer, acc, quiet, fresh=fresh, original=original, section=model, out=out
            )
        if not resume:
            _publish(work, out, acc, overwrite, run)
    finally:
        if not resume and acc.is_main_process:
            outputs.discard(work)  # a no-op once published
    if run["start_path"].is_relative_to(work) and not resume:  # converted on the fly: now in the published run
        run["start_path"] = out / run["start_path"].relative_to(work)
    try:
        # another clakit process refuses to replace or resume this run while it trains; a failed write (a full disk
        # while saving a checkpoint, metrics or the result) is one line
        held = acc.is_main_process and not resume  # a resumed run is held already, since its check (_uptrain)
        with outputs.hold(out, "train.output_dir") if held else contextlib.nullcontext():
            with outputs.os_errors(out):
                return _train_and_save(recipe, out, run, acc, quiet)
    except BaseException as e:
        if not resume:
            _abandon(out, acc, e, run)
        raise


def _setup(
    recipe: Recipe, work: Path, data, tokenizer, acc, quiet: bool, fresh: bool, original=None, section=None, out=None
) -> dict:
    data, digest, shape = data
    run = {"data": data, "data_sha256": digest, "shape": shape, "tokenizer": tokenizer, "quiet": quiet, "reports": {}}
    # dtype: the result's and the teacher's; student_dtype: the student's while training. FSDP flattens each wrapped
    # layer into one tensor of one dtype, so there the student stays fp32 (the trainable tensors are fp32) and
    # FSDP's mixed precision computes in bf16.
    run["dtype"] = dtype = torch.bfloat16 if recipe.train.bf16 else torch.float32
    run["student_dtype"] = torch.float32 if checkpoint.sharded(acc) else dtype
    if (section or recipe.model).source and not (work / "converted" / "config.json").is_file():
        # CLA: before the conversion (at 70B: hours), every process, so they stop together
        check_conversion_space(out or work, section or recipe.model, recipe, data, shape, fresh)
    start_path = prepare_student_checkpoint(recipe, work, acc, quiet, section, out)
    # before any model loads (at 70B minutes of reading per model): every process, so they stop together
    check_run_space(out or work, start_path, recipe, data, shape, fresh)
    model = _load_student(start_path, run["student_dtype"], acc, recipe.model.allow_pickle)
    # under FSDP the converted model is scored once accelerate has sharded it (_score_converted): whole, it would
    # not fit one device at the sizes FSDP is for
    run["score_converted"] = fresh and checkpoint.sharded(acc)
    if fresh and not checkpoint.sharded(acc):
        _say(f"held-out numbers of the converted model ({recipe.data.eval_max_tokens} tokens at most)", quiet)
        converted = heldout_report(model, "converted", recipe, data, tokenizer, quiet)
        run["reports"]["converted"] = with_origin(converted, start_path, _published(start_path, work, out))
    model = student.make_trainable(model, recipe.lora, recipe.train.gradient_checkpointing)
    teacher = _load_teacher(original, dtype, model, acc, recipe.model) if recipe.needs_teacher else None
    if fresh:
        _say("held-out numbers of the original model", quiet)
        run["reports"]["original"] = original_report(recipe, original, teacher, dtype, run, acc)
    if acc.is_main_process and fresh:
        (work / "recipe.yaml").write_text(recipe.to_yaml())
        start = start_path.relative_to(work) if start_path.is_relative_to(work) else start_path
        record = {"fingerprint": recipe.fingerprint(), "recipe": recipe.to_dict(), "start_checkpoint": str(start)}
        record["start_summary"] = checkpoint_summary(start_path)  # a resume refuses a start replaced since
        record["original"] = _source_record(original)  # resolved: the teacher a resume uses, wherever it runs
        record["data_sha256"] = digest  # a resume must read the same blocks
        record["data_processes"] = acc.num_processes  # ... on the same number of processes (check_same_data)
        record["resolved"] = card.resolved_defaults(recipe, card.conversion_record(start_path))  # null keys
        record["provenance"] = card.run_provenance()  # versions, command line and time of the run's start
        (work / "run.json").write_text(json.dumps(record, indent=1))
        _write_reports(work, run["reports"])
    return run | {"model": model, "teacher": teacher, "start_path": start_path}


def run_bytes(model, dtype: torch.dtype) -> tuple[int, int]:
    """(the merged result's bytes, one checkpoint's bytes) for the trainable student `model` (peft-wrapped, before
    accelerate shards it; meta tensors count too): the result is every non-LoRA weight in `dtype` (LoRA merges into
    them; tied weights once); a checkpoint is each trainable tensor and AdamW's two moments of it, in its dtype,
    plus what its files add beside the tensors (measured on a tiny run: ~10 KB of RNG states, ~1 KB of scheduler,
    under 1 KB of pickle per optimizer tensor), bounded above by 64 KB and 1 KB per trainable tensor."""
    result = sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name) * dtype.itemsize
    trainable = [p.numel() * p.element_size() for p in model.parameters() if p.requires_grad]
    return result, 3 * sum(trainable) + (64 << 10) + (1 << 10) * len(trainable)


RUN_SPACE_FIX = "set train.output_dir on a disk with room (or a smaller train.save_total_limit)"


def check_run_space(out: Path, start_path: Path, recipe: Recipe, data, shape: StepShape, fresh: bool) -> None:
    """Refuse before training where the disk cannot hold the result and the checkpoints the run keeps (at most
    save_total_limit, one more while the newest is written before the oldest goes; a resume: one more): at 70B the
    result alone is ~140 GB, and a full disk found at the save comes after the whole training. Counted on the
    student's skeleton (`trainable_skeleton`), so it runs before any model is loaded."""
    need, what = _run_need(trainable_skeleton(start_path, recipe), recipe, data, shape, fresh)
    outputs.check_free_space(out, need, what, RUN_SPACE_FIX)


def check_conversion_space(out: Path, section, recipe: Recipe, data, shape: StepShape, fresh: bool) -> None:
    """model.source, before it is converted: room for the conversion's output (OUTPUT_DIR/converted) and for the
    run's (check_run_space), both counted from the source's config on the meta device, with the layout the
    conversion will write (every layer a producer where the converter chooses it on data: the most it can write).
    Checked after the conversion, the run's need was said only once it had run (at 70B: hours)."""
    from clakit.convert.inmemory import cla_config

    source = resolve_source(_model_spec(section), section.revision, section.allow_pickle)
    config = load_config(source, section.trust_remote_code)
    planned = student.planned_layout(section, config)
    layout = planned or list(range(config.num_hidden_layers))
    lora = recipe.lora if planned else student.without_layout(recipe.lora)  # chosen on data: consumers unknown
    # peft initialises the skeleton's adapters on the CPU before moving them to meta: drawn from the RNG here, they
    # would shift the student's LoRA init, and a run converting on the fly train from other adapters than one
    # started from the converted checkpoint (check_run_space draws in both)
    with torch.random.fork_rng(devices=[]):
        skeleton = trainable_skeleton(cla_config(config, layout), dataclasses.replace(recipe, lora=lora))
    converted = _conversion_bytes(skeleton, section.convert, source, config)
    need, what = _run_need(skeleton, recipe, data, shape, fresh)
    what = f"the conversion of model.source ({outputs.size_text(converted)}), {what}"
    outputs.check_free_space(out, converted + need, what, RUN_SPACE_FIX)


def _conversion_bytes(skeleton, convert_section, source, config) -> int:
    """The bytes the conversion writes for the CLA `skeleton`: in model.convert.output_dtype, else each tensor in
    the source's own dtype (settings.dtype; a config naming bfloat16 over float32 tensors is written in float32, and
    counted from the config it was half what was written), so at the source's bytes per value; a GGUF dequantised to
    fp32; pickle weights, not opened here, by their config's dtype (fp32 where it names none)."""
    named = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if convert_section is not None and convert_section.output_dtype:
        return run_bytes(skeleton, named[convert_section.output_dtype])[0]
    if source.kind == "gguf":  # any case, or no suffix (sources._is_gguf)
        return run_bytes(skeleton, torch.float32)[0]
    stored = _stored_itemsize(source.path)
    if stored is not None:
        return math.ceil(run_bytes(skeleton, torch.float32)[0] * stored / 4)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return run_bytes(skeleton, named.get(str(dtype).removeprefix("torch."), torch.float32))[0]


def _stored_itemsize(folder: Path) -> float | None:
    """Bytes per value of a safetensors checkpoint's floating tensors (from their headers, no data read; fp32 norms
    beside bf16 weights count by their share); None for other weights."""
    from clakit.convert.checkpoint import open_checkpoint

    try:
        checkpoint = open_checkpoint(folder, allow_pickle=False)
    except ClakitError:
        return None
    tensors = [checkpoint.get(name) for name in checkpoint.names]
    floats = [t for t in tensors if t.is_floating_point()]
    values = sum(t.numel() for t in floats)
    return sum(t.numel() * t.element_size() for t in floats) / values if values else None


def _run_need(skeleton, recipe: Recipe, data, shape: StepShape, fresh: bool) -> tuple[int, str]:
    """(bytes, what they are) of the result and the checkpoints a run of the trainable `skeleton` keeps."""
    train = recipe.train
    result, one = run_bytes(skeleton, torch.bfloat16 if train.bf16 else torch.float32)
    steps = make_plan(train, len(data.train), data.seq_len, shape).total_steps
    saves = (steps - 1) // train.save_steps if train.save_steps > 0 else 0  # none at the last step: the result
    kept = min(saves, train.save_total_limit + 1 if train.save_total_limit else saves, 1 if not fresh else saves)
    what = f"the trained model ({outputs.size_text(result)}) and {kept} checkpoint(s) of {outputs.size_text(one)}"
    return result + kept * one, what


def trainable_skeleton(start, recipe: Recipe):
    """The student of `start` (a CLA checkpoint's path, or a CLA config) made trainable (recipe.lora) on the meta
    device: every shape `run_bytes` counts, no weight read (the config only)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    section = recipe.model
    config = load_config(resolve_source(str(start)), section.trust_remote_code) if isinstance(start, Path) else start
    with init_empty_weights():  # parameters on meta
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=section.trust_remote_code)
    model.tie_weights()  # from_config leaves lm_head untied where the config ties it: counted once, as loaded
    return student.make_trainable(model, recipe.lora)


def _load_student(start_path: Path, dtype: torch.dtype, acc, allow_pickle: bool):
    """The student on acc's device; under FSDP left on the CPU for accelerate to shard layer by layer onto the
    device, and with `fsdp_cpu_ram_efficient_loading` read by the main process only (accelerate broadcasts it)."""
    if not checkpoint.sharded(acc):
        return student.load_cla(start_path, dtype, allow_pickle).to(acc.device)
    if sharding.ram_efficient(acc) and not acc.is_main_process:
        return sharding.empty_model(resolve_source(str(start_path)), dtype)
    return student.load_cla(start_path, dtype, allow_pickle)


def _load_teacher(original, dtype: torch.dtype, model, acc, section):
    """The teacher on acc's device, sharing the student's frozen tensors; under FSDP its own copy (the student's is
    flattened and freed between uses), read by the main process only and sharded over the processes. `section`: the
    model section (what it may execute: student.code_settings)."""
    if checkpoint.sharded(acc):
        load = student.code_settings(section)
        return sharding.shard_frozen(sharding.load_on_main(original, dtype, acc, **load), acc)
    return load_teacher(original, dtype, model, **student.code_settings(section)).to(acc.device)


def _write_reports(run_dir: Path, reports: dict) -> None:
    from clakit.eval import write_json

    (run_dir / EVAL).mkdir(exist_ok=True)
    for name, r in reports.items():
        if r is not None:
            write_json(r, run_dir / EVAL / f"{name}.json")


def _numbers(r: dict | None) -> dict | None:
    """The card's view of an eval report."""
    return r and {"loss": r["nll_per_token"], "perplexity": r["perplexity"], "tokens": r["num_tokens"]}


def _train_and_save(recipe: Recipe, out: Path, run: dict, acc, quiet: bool) -> Path:
    if "tensorboard" in recipe.train.report_to:
        acc.init_trackers("tensorboard")
    trainer = Trainer(recipe, run["model"], run["teacher"], run["data"], acc, out, quiet=quiet, shape=run["shape"])
    # the old run an --overwrite kept aside is no longer needed once this one has a checkpoint
    trainer.after_first_save = functools.partial(_drop_replaced, run, out)
    if run.get("score_converted"):
        _score_converted(recipe, out, trainer, run, acc)
    last = checkpoint.checkpoint_dirs(out)
    if last:
        _say(f"resuming from {last[-1]}", quiet)
        trainer.resume(last[-1])
    elif acc.is_main_process:  # killed (-9) before its first checkpoint: the steps it logged are trained again
        drop_metrics_after(out / METRICS, -1)
    with _peer_lost(acc, out):
        trainer.run()
    acc.wait_for_everyone()
    if checkpoint.sharded(acc):
        failed = _save_sharded(recipe, out, trainer, run, acc)
    else:
        failed = _save_whole(recipe, out, trainer, run, acc)
    acc.wait_for_everyone()
    acc.end_training()
    if failed:  # after the others are released: they would wait for it otherwise
        raise failed
    return out / RESULT


# what gloo and NCCL say in the processes left when another one of the run dies inside a collective
PEER_LOST = re.compile(r"gloo|nccl|connection (closed|reset)|remote worker|broken pipe", re.IGNORECASE)


@contextlib.contextmanager
def _peer_lost(acc, out: Path):
    """Several processes: one of them killed (the OOM killer, a preempted node) stops the others inside a collective
    with gloo's or NCCL's RuntimeError, a 60-line traceback on each; one line instead, saying how to go on."""
    try:
        yield
    except RuntimeError as e:
        if acc.num_processes == 1 or not PEER_LOST.search(str(e)):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:200]  # gloo adds advice
        last = checkpoint.checkpoint_dirs(out)
        then = f"add --resume to the same launch to continue from {last[-1].name}" if last else "run it again"
        raise ClakitError(f"another process of this run stopped while training ({first}); {then}") from None


def _score_converted(recipe: Recipe, out: Path, trainer, run: dict, acc) -> None:
    """Under FSDP: the converted model's held-out report from the sharded student before its first step (LoRA's B
    is zero, the fully trained tensors untouched: the converted model's function), every process in step."""
    _say(f"held-out numbers of the converted model ({recipe.data.eval_max_tokens} tokens at most)", run["quiet"])
    r = heldout_report(trainer.model, "converted", recipe, run["data"], run["tokenizer"], run["quiet"])
    if acc.is_main_process:
        with_origin(r, run["start_path"])
        _write_reports(out, {"converted": r})


def _save_whole(recipe: Recipe, out: Path, trainer, run: dict, acc) -> ClakitError | None:
    """One process (or DDP, each holding the whole model): merge LoRA in memory, score, save."""
    model = student.merged(acc.unwrap_model(trainer.model), run["dtype"])
    end = heldout_report(model, "uptrained", recipe, run["data"], run["tokenizer"], run["quiet"])
    if not acc.is_main_process:
        return None
    with outputs.staged(out / RESULT, "model", overwrite=True) as tmp:  # a full disk leaves no half-written model/
        student.save_cla(model, run["tokenizer"], tmp)
        summary = _card(recipe, out, trainer, run, end, tmp, model.config.kv_source_layers)
        failed = _write_end_eval(out, with_origin(end, tmp, out / RESULT))  # before the model is published
    _drop_replaced(run, out)  # once the model is in place (a run without checkpoints: train.save_steps 0)
    return _finish(out, summary, failed, run["quiet"])


def _save_sharded(recipe: Recipe, out: Path, trainer, run: dict, acc) -> ClakitError | None:
    """FSDP: every process scores the sharded trained model in step; the main process merges the trained tensors
    into the start checkpoint tensor by tensor as it writes, each layer's trained tensors gathered to it when the
    merge reaches that layer (no process ever holds the whole model, nor the main process all trained tensors)."""
    end = heldout_report(trainer.model, "uptrained", recipe, run["data"], run["tokenizer"], run["quiet"])
    # CLA: gathered a layer at a time as the merge asks: whole, at 70B with every attention projection trained in
    # full, they were 48 GB of fp32 on the main process's host beside what it writes
    trained = checkpoint.GatheredTrainable(trainer.model)  # collective
    if not acc.is_main_process:
        trained.serve()  # until the main process has merged the last layer (or failed)
        return None
    try:
        with outputs.staged(out / RESULT, "model", overwrite=True) as tmp:
            student.save_merged(run["start_path"], trained, recipe.lora, run["dtype"], tmp, recipe.model.allow_pickle)
            trained.close()
            student.save_tokenizer(run["tokenizer"], tmp)
            layout = json.loads((tmp / "config.json").read_text())["kv_source_layers"]
            summary = _card(recipe, out, trainer, run, end, tmp, layout)
            failed = _write_end_eval(out, with_origin(end, tmp, out / RESULT))  # before the model is published
    finally:
        trained.close()  # a failed merge releases the others too (they would wait for the next layer)
    _drop_replaced(run, out)  # once the model is in place (a run without checkpoints: train.save_steps 0)
    return _finish(out, summary, failed, run["quiet"])


def _card(recipe: Recipe, out: Path, trainer, run: dict, end: dict, folder: Path, layout: list[int]) -> dict:
    numbers = {n: _numbers(r) for n, r in _start_reports(out).items()} | {"uptrained": _numbers(end)}
    started = {}  # run.json, written when the run started (a resume too); a damaged one must not cost the model
    with contextlib.suppress(ClakitError):
        started = run_record(out) or {}
    conversion = card.conversion_record(run["start_path"])  # read once: the origins' and the resolved defaults'
    summary = card.summary(recipe, trainer, run["data"], numbers, layout)
    summary |= card.origins(run["start_path"], started.get("original"), conversion)
    # the first session's command, time and versions: uptrain.json's own are the last session's (`--resume`'s)
    summary["started"] = started.get("provenance")
    summary["data_sha256"] = run["data_sha256"]  # the tokens it trained and was scored on (run.json's too)
    # the start checkpoint by content (run.json's, which stays in the run folder): its path names what is there later
    summary["start_summary"] = started.get("start_summary")
    summary["resolved"] = card.resolved_defaults(recipe, conversion)
    card.write(folder, summary, run["start_path"])
    return summary


def _finish(out: Path, summary: dict, failed: ClakitError | None, quiet: bool) -> ClakitError | None:
    _say(card.one_line(summary), quiet)
    return _report_failure(out, failed or _write_report_page(out))


def _start_reports(out: Path) -> dict:
    """The held-out reports written when the run started (eval/original.json, converted.json). One that cannot be
    read (damaged since) is left out of the card (n/a): read while the result is being saved, its error would
    discard the trained model, and every --resume would train the last steps again to fail the same way. The report
    page, written after the model is in place, names the damaged file."""
    from clakit.eval import read_report

    reports = {}
    for name, path in _report_files(out, REPORTS[:2]).items():
        with contextlib.suppress(ClakitError):
            reports[name] = read_report(path)
    return reports


def _report_files(out: Path, names) -> dict[str, Path]:
    """The eval reports among `names` the run has written, by name."""
    return {n: out / EVAL / f"{n}.json" for n in names if (out / EVAL / f"{n}.json").is_file()}


def _write_end_eval(out: Path, end: dict) -> ClakitError | None:
    """eval/uptrained.json, written before the model is published: a run killed between the two would have
    --resume find it finished with no held-out numbers, which only the trained model in memory had. It can fail where
    a user put files of their own (clakit replaces only what it wrote): hours of training must not be lost over a
    report, so the failure is returned, to be raised once the model is saved."""
    try:
        _write_reports(out, {"uptrained": end})
    except ClakitError as e:
        return e
    return None


def _write_report_page(out: Path) -> ClakitError | None:
    """The report page from the run's eval/*.json, after the model is in place (and by --resume, where a run was
    killed before it was written)."""
    from clakit.eval import report

    try:
        report(list(_report_files(out, REPORTS).values()), out / "report")
    except ClakitError as e:
        return e
    return None


def _complete_report(out: Path) -> None:
    """--resume of a finished run: the report page, where the run was killed after publishing its model (which
    comes after eval/uptrained.json) and before the page. Anything else there is left as it is."""
    if (out / EVAL / "uptrained.json").is_file() and not (out / "report").exists():
        failed = _report_failure(out, _write_report_page(out))
        if failed:
            raise failed


def _report_failure(out: Path, e: ClakitError | None) -> ClakitError | None:
    """A failed report as one line naming the saved model (the run has finished: --resume has nothing to do)."""
    if e is None:
        return None
    why = f"the model is saved in {out / RESULT}, but its report could not be written ({e})"
    # in the page's order, not a glob's: the first report is the baseline (the shell sorts converted.json first)
    files = " ".join(str(path) for path in _report_files(out, REPORTS).values())
    return ClakitError(f"{why}; write it with `clakit report {files} -o FOLDER`")
