"""`clakit demo`: the main job end to end on a real model: fetch SmolLM2 and public-domain text, convert it to CLA
at half the KV cache with the converter's default for calibration data (its best measured combination: a layout
chosen on the calib text, then per-group reconstruction and a short end-to-end distillation), recover quality with
a shortened run of the CPU uptraining recipe, evaluate the original, the converted and the uptrained model on
held-out text, write the report with its plot.

The demo is a list of stages sharing one `DemoContext`; a stage adds models to `ctx.models` (label -> model spec)
and the eval stage evaluates every model not evaluated yet, so a later step (uptraining) is one more stage:

    STAGES.insert(STAGES.index(convert_stage) + 1, Stage("uptrain", my_uptrain))  # ctx.models["uptrained"] = ...
"""

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from clakit import outputs
from clakit.demo import reuse
from clakit.demo.fetch import DemoAssets, default_cache_dir, fetch_demo, recorded_sources
from clakit.errors import ClakitError
from clakit.eval.records import check_output
from clakit.paths import expand
from clakit.provenance import CONVERT_RECORD

DEFAULT_WORK_DIR = "clakit-demo"
DEMO_FORMAT = "clakit-demo/1"
# what the demo writes in its work folder, by the ownership rule (clakit.outputs): an earlier demo's outputs are
# replaced, anything else there is refused before the first stage runs
DEMO_FOLDERS = {"converted": "convert", "uptrain": "uptrain", "report": "report"}
DEMO_REPORTS = ("original", "converted", "uptrained")


@dataclass
class DemoSettings:
    """Bounded so the whole demo fits in ~20 minutes on 2 CPU cores."""

    kv_saving: float = 0.5  # CLA2's: half the KV cache
    calib_tokens: int = 4096  # the layout's and fits' tokens; the distillation reads its own 16,384 (--distill-tokens)
    seq_len: int = 512
    max_tokens: int = 4096  # held-out tokens scored per model
    batch_size: int = 1
    decode_steps: int = 8
    uptrain_steps: int = 60  # a shortened recipes/smollm2/135m_cla2_cpu.yaml; 0 skips the recovery step
    uptrain_seq_len: int = 512  # the recipe's windows (batch 2: 1,024 tokens a step)
    quiet: bool = False

    def __post_init__(self):
        """Refused when made, before any stage: the eval stage comes after fetching, converting and uptraining, so a
        --max-tokens below one window failed there, minutes in, naming a --seq-len `clakit demo` has no flag for."""
        if self.max_tokens <= 0:
            raise ClakitError(f"--max-tokens must be positive, got {self.max_tokens}")
        if self.max_tokens < self.seq_len:
            raise ClakitError(
                f"--max-tokens {self.max_tokens} is less than one window of the demo's evaluation ({self.seq_len} "
                f"tokens); give --max-tokens {self.seq_len} or more"
            )
        if self.uptrain_steps < 0:
            raise ClakitError(f"--uptrain-steps must be 0 (skip) or positive, got {self.uptrain_steps}")


@dataclass
class DemoContext:
    work_dir: Path
    cache_dir: Path | None
    settings: DemoSettings
    assets: DemoAssets | None = None
    models: dict[str, str] = field(default_factory=dict)  # label -> model spec, in report order
    reports: dict[str, Path] = field(default_factory=dict)  # label -> eval report
    report_dir: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)
    sources: dict | None = None  # where fetch-demo's assets came from (its manifest's record)
    earlier: dict = field(default_factory=dict)  # the stage records of the demo.json found in work_dir (reuse)
    stages: dict = field(default_factory=dict)  # this run's: stage -> {"key", "run_id", "files"}, to demo.json
    reused: list[str] = field(default_factory=list)  # the stages whose earlier output was kept

    def keep(self, stage: str, stage_key: str, out: Path, complete: Path) -> bool:
        """Whether the earlier demo's output of `stage` is still what this run would write (reuse.kept): then it is
        kept and said so; this run's record of the stage is written either way (`done`)."""
        if not reuse.kept(self.earlier, stage, stage_key, out, complete):
            return False
        self.reused.append(stage)
        self.say(f"{stage}: {out} is up to date (same inputs, settings and clakit), kept; remove it to redo it")
        return True

    def done(self, stage: str, stage_key: str, out: Path) -> None:
        self.stages[stage] = {"key": stage_key, "run_id": reuse.run_id(out), "files": reuse.listing(out)}

    def say(self, message: str) -> None:
        if not self.settings.quiet:
            print(f"[demo] {message}", flush=True)


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[DemoContext], None]


def fetch_stage(ctx: DemoContext) -> None:
    if ctx.assets is None:
        ctx.assets = fetch_demo(ctx.cache_dir, quiet=ctx.settings.quiet)
        ctx.sources = recorded_sources(ctx.cache_dir or default_cache_dir())
    ctx.models.setdefault("original", str(ctx.assets.model))


def convert_stage(ctx: DemoContext) -> None:
    """The converter's default with calibration data (its best measured combination) at `kv_saving`."""
    from clakit.convert import convert

    s = ctx.settings
    out = ctx.work_dir / "converted"
    key = reuse.key(
        "convert", reuse.files(ctx.assets.model), reuse.files(ctx.assets.calib), s.kv_saving, s.calib_tokens
    )
    if not ctx.keep("convert", key, out, out / "config.json"):
        convert(
            str(ctx.assets.model),
            str(out),
            kv_saving=s.kv_saving,
            calib_data=[str(ctx.assets.calib)],
            calib_tokens=s.calib_tokens,
            overwrite=True,  # replaces only a clakit convert output (an earlier demo's), never a folder of the user's
            quiet=s.quiet,
        )
    ctx.done("convert", key, out)
    ctx.models["converted"] = str(out)


def uptrain_stage(ctx: DemoContext) -> None:
    """The shipped CPU recipe (attention projections in full, LoRA on the MLPs, distillation), shortened, from the
    converted model."""
    from clakit.uptrain import DEFAULT_RECIPE, uptrain

    s = ctx.settings
    if s.uptrain_steps <= 0:
        return
    run_dir, a = ctx.work_dir / "uptrain", ctx.assets
    texts = [reuse.files(p) for p in (a.model, a.train, a.train_bible, a.heldout, DEFAULT_RECIPE)]
    # the conversion it starts from by its run_id: converted again, the run is stale
    key = reuse.key("uptrain", reuse.run_id(Path(ctx.models["converted"])), texts, s.uptrain_steps,
                    s.uptrain_seq_len, s.max_tokens)  # fmt: skip
    if ctx.keep("uptrain", key, run_dir, run_dir / "model" / "config.json"):
        ctx.done("uptrain", key, run_dir)
        ctx.models["uptrained"] = str(run_dir / "model")
        return
    overrides = _uptrain_overrides(ctx, run_dir)
    ctx.models["uptrained"] = str(uptrain(DEFAULT_RECIPE, overrides, overwrite=True, quiet=s.quiet))
    ctx.done("uptrain", key, run_dir)


def _uptrain_overrides(ctx: DemoContext, run_dir: Path) -> list[str]:
    """The shortened recipe's overrides: the demo's conversion, assets and settings."""
    from clakit.uptrain import DEFAULT_RECIPE, load_recipe

    s = ctx.settings
    return [
        # paths as JSON strings (YAML reads them): a " #", ": " or a leading "[" stays part of the path
        f"model.path={json.dumps(str(ctx.models['converted']))}",
        "model.source=null",
        "model.convert=null",
        f"model.original={json.dumps(str(ctx.assets.model))}",
        # JSON lists (YAML reads them): a path with a comma or a space stays one path
        f"data.train={json.dumps([str(p) for p in (ctx.assets.train, ctx.assets.train_bible) if p])}",
        f"data.eval={json.dumps([str(ctx.assets.heldout)])}",
        f"data.seq_len={s.uptrain_seq_len}",
        f"data.eval_max_tokens={max(s.max_tokens, s.uptrain_seq_len)}",
        f"train.output_dir={json.dumps(str(run_dir))}",
        f"train.max_steps={s.uptrain_steps}",
        f"train.save_steps={s.uptrain_steps}",
        f"train.eval_steps={s.uptrain_steps}",
        # a warmup as long as the run never reaches the peak rate (uptrain refuses it): the recipe's, shortened to
        # end before the last step (0 at 1 step, whose only step would train at learning rate 0)
        f"train.warmup_steps={min(load_recipe(DEFAULT_RECIPE).train.warmup_steps, s.uptrain_steps - 1)}",
    ]


def eval_stage(ctx: DemoContext) -> None:
    """Every model not evaluated yet, on the held-out text with the same settings."""
    from clakit.eval.records import write_json
    from clakit.eval.suite import evaluate

    s = ctx.settings
    for label, spec in ctx.models.items():
        if label in ctx.reports:
            continue
        ctx.say(f"evaluating {label} on {s.max_tokens} held-out tokens")
        result = evaluate(
            spec,
            data=[str(ctx.assets.heldout)],
            seq_len=s.seq_len,
            max_tokens=s.max_tokens,
            batch_size=s.batch_size,
            decode_steps=s.decode_steps,
            quiet=s.quiet,
            name=label,
        )
        ctx.reports[label] = write_json(result, ctx.work_dir / "reports" / f"{label}.json")
        ctx.say(
            f"{label}: perplexity {result['perplexity']:.2f}, KV {result['kv_cache']['bytes_per_token']:,} bytes/token"
        )


def report_stage(ctx: DemoContext) -> None:
    from clakit.eval.comparison import report

    ctx.report_dir = report([ctx.reports[label] for label in ctx.models], ctx.work_dir / "report")


STAGES: list[Stage] = [
    Stage("fetch", fetch_stage),
    Stage("convert", convert_stage),
    Stage("uptrain", uptrain_stage),
    Stage("eval", eval_stage),
    Stage("report", report_stage),
]


def check_work_dir(work_dir: Path) -> None:
    """Before the first stage: every output the demo writes may be written (an earlier demo's, or new), and none
    inside another clakit output (its --overwrite would remove them, or be blocked by them)."""
    outputs.check_not_inside_an_output(work_dir / "demo.json", "the demo's output")  # work_dir itself too
    for name, kind in DEMO_FOLDERS.items():
        outputs.check_folder(work_dir / name, kind, overwrite=True, label="demo output folder")
    for label in DEMO_REPORTS:
        check_output(work_dir / "reports" / f"{label}.json")
    outputs.check_file(
        work_dir / "demo.json", DEMO_FORMAT, noun="demo summary", fix="move it away, or choose another --work-dir"
    )


def _run_stages(ctx: DemoContext, stages: list[Stage]) -> None:
    """Each stage in turn; demo.json after each (finished: false), so a rerun after a failed stage keeps the
    stages before it (reuse)."""
    for stage in stages:
        ctx.say(f"stage {stage.name}")
        start = time.perf_counter()
        stage.run(ctx)
        ctx.timings[stage.name] = round(time.perf_counter() - start, 1)
        _write_summary(ctx, finished=False)


@contextlib.contextmanager
def _held(work_dir: Path):
    """The work folder, held by this demo (a flock on the folder, released when the process ends, also on kill -9):
    a second demo in the same --work-dir ran every stage beside the first (each converts with overwrite=True: its
    conversion could replace the one the first uptrains from). Refused in one line (outputs.held); where the file
    system has no locks, or is NFS (its flock needs a descriptor open for writing, and a folder's is not), the demo
    runs unheld."""
    busy = f"--work-dir {work_dir} is in use by another clakit demo; wait for it to end or choose another folder"
    with outputs.held(os.open(work_dir, os.O_RDONLY), busy):
        yield


def _earlier_stages(work_dir: Path) -> dict:
    """The stage records of the demo.json an earlier demo wrote in `work_dir` ({} when none can be read)."""
    try:
        summary = json.loads((work_dir / "demo.json").read_text())
    except (OSError, ValueError):
        return {}
    ok = isinstance(summary, dict) and summary.get("format") == DEMO_FORMAT and isinstance(summary.get("stages"), dict)
    return summary["stages"] if ok else {}


def _write_summary(ctx: DemoContext, finished: bool) -> dict:
    """demo.json: timings, models, settings, what the machine chose, the stages' records and which were kept."""
    from clakit.provenance import provenance

    summary = {
        "format": DEMO_FORMAT,
        "finished": finished,
        "timings_s": ctx.timings,
        "total_s": round(sum(ctx.timings.values()), 1),
        "models": ctx.models,
        "settings": vars(ctx.settings),
        "resolved": _resolved(ctx),
        # what a rerun compares (reuse): the key and run_id of each stage's output; an earlier demo's record of a
        # stage this run skipped (--uptrain-steps 0) is kept: its output is still there, and the next run redid it
        "stages": {**ctx.earlier, **ctx.stages},
        "reused": ctx.reused,
        # the texts each stage read and where they came from: the reports name only the held-out one
        "assets": {name: str(path) for name, path in vars(ctx.assets).items() if path} if ctx.assets else None,
        "provenance": provenance(cache_dir=str(ctx.cache_dir) if ctx.cache_dir else None, sources=ctx.sources),
    }
    outputs.write_file(ctx.work_dir / "demo.json", json.dumps(summary, indent=2, default=str) + "\n", DEMO_FORMAT)
    return summary


def _resolved(ctx: DemoContext) -> dict:
    """What the machine chose for the demo: the conversion's end-to-end distillation (its default, or skipped where
    the student does not fit free memory), as its record says it ran; {} without a conversion."""
    from clakit.uptrain.card import distill_resolution, read_record

    record = read_record(ctx.work_dir / "converted" / CONVERT_RECORD) if "converted" in ctx.models else None
    if not isinstance((record or {}).get("settings"), dict):
        return {}
    pin = "`clakit demo` converts at the converter's default; `clakit convert --distill-steps N` pins it"
    return {"convert.distill_steps": distill_resolution(record, pin)}


def run_demo(
    work_dir=None,
    *,
    cache_dir=None,
    assets: DemoAssets | None = None,
    stages: list[Stage] | None = None,
    settings: DemoSettings | None = None,
) -> Path:
    """Run the stages in order; returns the report folder (report.md, ppl_vs_kv.png, report.html). A stage whose
    output an earlier demo in `work_dir` wrote from the same inputs, settings and clakit is kept (reuse)."""
    ctx = DemoContext(
        expand(work_dir or DEFAULT_WORK_DIR, "--work-dir"),
        # resolved before any stage: a missing HOME is refused before the work, not when demo.json is written
        expand(cache_dir, "demo cache") if cache_dir else (None if assets else default_cache_dir()),
        settings or DemoSettings(),
        assets,
    )
    check_work_dir(ctx.work_dir)
    # a failed stage (a refused input, Ctrl-C) left the work folder it had just created, empty
    with outputs.new_parents_removed_on_failure(ctx.work_dir / "demo.json"):
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        with _held(ctx.work_dir):
            ctx.earlier = _earlier_stages(ctx.work_dir)  # under the lock: what a demo running there now wrote is read
            _run_stages(ctx, stages or STAGES)
            summary = _write_summary(ctx, finished=True)
    if ctx.report_dir:
        ctx.say(f"done in {summary['total_s']:.0f} s")
        ctx.say((ctx.report_dir / "report.md").read_text().split("\n\n")[1])
    return ctx.report_dir
