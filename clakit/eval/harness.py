"""Optional lm-evaluation-harness tasks (`pip install "clakit[lm-eval]"`) run on the already-loaded model.

Tasks are lm-eval task names (`hellaswag`, `arc_easy`: their datasets come from the Hugging Face Hub) or paths to
task YAML files, which can read local data (`dataset_path: json` + `dataset_kwargs: {data_files: ...}`), so a task
runs offline. `include` folders are scanned for more task YAMLs (lm-eval's `--include_path`).

The scores land in the report as
    {"tasks": {task: {"acc": 0.61, "acc_stderr": 0.02, ..., "num_samples": 500, "num_fewshot": 0}},
     "settings": {"tasks": [...], "include": [...], "limit": ..., "num_fewshot": ..., "batch_size": ...,
                  "max_length": ...},
     "version": "0.4.x", "task_hashes": {task: {"documents": sha256, "prompts": sha256}}}
Metric keys are lm-eval's `metric,filter` keys with the default filter `,none` dropped (`acc,none` -> `acc`).
"""

import hashlib
import itertools
import json
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from clakit.errors import ClakitError
from clakit.paths import expand

INSTALL_HINT = 'pip install "clakit[lm-eval]"'
YAML_SUFFIXES = (".yaml", ".yml")


@dataclass
class Tasks:
    """What to run, checked (names known, files present, datasets loadable) before any model is loaded."""

    specs: list[str]  # task / group / tag names, or absolute paths of task YAML files
    include: list[str] = field(default_factory=list)  # extra folders of task YAMLs
    limit: int | None = None  # at most this many documents per task (lm-eval's --limit)
    num_fewshot: int | None = None  # None: each task's own default
    manager: object = None  # the lm_eval TaskManager that resolved the specs
    hashes: dict = field(default_factory=dict)  # task -> sha256 of its documents and prompts (task_hashes)

    def settings(self, batch_size: int, max_length: int | None = None) -> dict:
        return {
            "tasks": self.specs,
            "include": self.include,
            "limit": self.limit,
            "num_fewshot": self.num_fewshot,
            "batch_size": batch_size,
            "max_length": max_length,
        }


def parse_tasks(tasks: str | list[str] | None) -> list[str]:
    if tasks is None or (not isinstance(tasks, str) and not tasks):  # an empty list: no tasks asked for
        return []
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    parsed = [t.strip() for t in names if t.strip()]
    if not parsed:  # "," or " ": asked for tasks and named none; silently scoring nothing would look like a run
        raise ClakitError(f"--lm-eval-tasks {tasks!r} names no task; give comma-separated names, e.g. wikitext,piqa")
    return parsed


def require_lm_eval() -> None:
    """Fail before any expensive work when lm_eval is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ClakitError(f"--lm-eval-tasks needs lm-evaluation-harness (not installed): {INSTALL_HINT}") from None


def _is_path(spec: str) -> bool:
    return spec.endswith(YAML_SUFFIXES) or "/" in spec


def _spec(spec: str) -> str:
    """A task name as given; a task file as an absolute path (lm-eval resolves names before paths)."""
    if not _is_path(spec):
        return spec
    path = expand(spec, "lm-eval tasks")
    if not path.is_file():
        raise ClakitError(f"lm-eval task file {spec} does not exist; give a task YAML file or a task name")
    return str(path.resolve())


def _folders(include) -> list[str]:
    folders = [include] if isinstance(include, str | Path) else list(include or [])
    for f in folders:
        if not expand(f, "--lm-eval-include").is_dir():
            raise ClakitError(f"--lm-eval-include {f} is not a folder; give a folder of lm-eval task YAML files")
    return [str(expand(f, "--lm-eval-include").resolve()) for f in folders]


def _check_count(name: str, value, allow_zero: bool) -> None:
    if value is not None and (not isinstance(value, int) or value < (0 if allow_zero else 1)):
        raise ClakitError(f"--{name} must be a {'non-negative' if allow_zero else 'positive'} integer, got {value}")


def prepare(tasks, include=None, limit: int | None = None, num_fewshot: int | None = None) -> Tasks | None:
    """Check the lm-eval settings and load each task once (names, files, datasets): None when no task is asked for.

    Loading here, before the model, makes an unknown name or an unreachable dataset fail in seconds.
    """
    specs = parse_tasks(tasks)
    if not specs:
        if include or limit is not None or num_fewshot is not None:
            raise ClakitError("--lm-eval-include/--lm-eval-limit/--lm-eval-fewshot need --lm-eval-tasks")
        return None
    require_lm_eval()
    _check_count("lm-eval-limit", limit, allow_zero=False)
    _check_count("lm-eval-fewshot", num_fewshot, allow_zero=True)
    specs, folders = [_spec(s) for s in specs], _folders(include)
    # lm-eval's own index (~15k task files) takes seconds to build: skip it when every task is a local file.
    builtin = any(not _is_path(s) for s in specs)
    manager, loaded = _load(specs, folders, builtin)
    return Tasks(specs, folders, limit, num_fewshot, manager, task_hashes(loaded, limit))


def _load(specs: list[str], folders: list[str], builtin: bool):
    """(the TaskManager, what it loaded: {"tasks": {name: Task}, ...})."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=folders or None, include_defaults=builtin)
    try:
        with _lm_eval_errors_only():
            loaded = manager.load(specs)
    except KeyError as e:
        if not builtin:  # a local group file may name built-in tasks
            return _load(specs, folders, True)
        raise ClakitError(f"unknown lm-eval task: {_first_line(e)}; see `lm-eval ls tasks`") from None
    except Exception as e:  # datasets offline or missing, bad YAML
        where = (
            "stock tasks download their data from the Hugging Face Hub (run once online, datasets caches it) "
            "or give a task YAML reading local files"
            if builtin
            else "check the task file's dataset_path / dataset_kwargs"
        )
        raise ClakitError(f"lm-eval could not load {','.join(specs)}: {_first_line(e)}; {where}") from None
    return manager, loaded


# where a task's data lies and where its YAML was read: the documents' own hash covers the data, so the same task
# read from another folder (another machine) still compares
NOT_PROMPTS = ("dataset_path", "dataset_name", "dataset_kwargs", "metadata")


def task_hashes(loaded: dict, limit: int | None) -> dict:
    """{task: {"documents": sha256 of the documents it scores (the first `limit`, as lm-eval's --limit),
    "prompts": sha256 of its prompt, choice, target and metric settings}}. A task name alone does not say what was
    scored: a task YAML's local data edited between two runs, or two YAMLs of one name, gave one report column."""
    out = {}
    for name, task in (loaded.get("tasks") or {}).items():
        config = {k: v for k, v in task.dump_config().items() if k not in NOT_PROMPTS}
        out[name] = {"documents": _sha256(itertools.islice(task.eval_docs, limit)), "prompts": _sha256([config])}
    return out


def _sha256(values) -> str:
    """Of canonical JSON, a line per value: a task's documents are hashed one by one as they are read."""
    digest = hashlib.sha256()
    for value in values:
        digest.update(json.dumps(value, sort_keys=True, default=_name_of).encode() + b"\n")
    return digest.hexdigest()


def _name_of(obj) -> str:
    """A function in a task config (process_docs, a filter) by its name: str() would hold its memory address, and
    the hash would differ on every run."""
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


@contextmanager
def _lm_eval_errors_only():
    """lm-eval logs much at INFO/WARNING that does not apply to a model handed over in memory (e.g. "do not launch
    via accelerate"); keep its errors only, for the duration of the call."""
    import lm_eval.evaluator as evaluator

    logger = logging.getLogger("lm_eval")
    level, git_hash = logger.level, evaluator.get_git_commit_hash
    logger.setLevel(logging.ERROR)
    # lm-eval runs `git describe` in the working directory (the user's, not the model's: nothing clakit records);
    # outside a repository git printed "fatal: not a git repository" on stderr, even with -q
    evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        logger.setLevel(level)
        evaluator.get_git_commit_hash = git_hash


def _first_line(e: Exception) -> str:
    text = str(e.args[0] if isinstance(e, KeyError) and e.args else e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def run_tasks(model, tokenizer, tasks: Tasks | str | list[str], batch_size: int, max_length: int | None = None):
    """lm-eval's HF wrapper (HFLM) around the in-memory model; CLA classes are registered by `import clakit`.

    `max_length`: the longest input HFLM gives the model (its rolling-loglikelihood windows, the left-truncation of
    long prompts); `clakit eval` passes its `--seq-len`, so lm-eval's word perplexity and bits per byte are measured
    on the same windows as clakit's own (None: lm-eval's default, the model's whole context)."""
    if not isinstance(tasks, Tasks):
        tasks = prepare(tasks)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    try:
        with _lm_eval_errors_only():
            lm = _hflm(HFLM)(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
            results = simple_evaluate(
                model=lm,
                tasks=tasks.specs,
                task_manager=tasks.manager,
                limit=tasks.limit,
                num_fewshot=tasks.num_fewshot,
                log_samples=False,
            )
    except Exception as e:  # a task that loads but cannot run on this model (e.g. longer than its context)
        raise ClakitError(f"lm-eval could not run {','.join(tasks.specs)}: {_failure(e, max_length)}") from None
    return {"tasks": scores(results), "settings": tasks.settings(batch_size, max_length), "version": _version(),
            "task_hashes": tasks.hashes}  # fmt: skip


def _hflm(base):
    """HFLM whose rolling loglikelihood reads the text without the tokenizer's own BOS: lm-eval 0.4.13 encodes it
    with the tokenizer's defaults (Llama-2's and Mistral's add_bos_token, Llama-3's post-processor add one) and then
    puts its prefix token (BOS) before it, so [BOS, BOS, text] was scored, BOS a target, and its word perplexity and
    bits per byte disagreed with clakit's own (single BOS) in the same report. Other requests (a multiple-choice
    context) keep the tokenizer's defaults."""

    class SinglePrefixHFLM(base):
        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            saved, self.add_bos_token = self.add_bos_token, False
            try:
                return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
            finally:
                self.add_bos_token = saved

    return SinglePrefixHFLM


def _failure(e: Exception, max_length) -> str:
    """The line naming why lm-eval stopped: its bare asserts (lm_eval/models/huggingface.py: every request needs a
    context and an answer, and an answer no longer than the window) say nothing but "AssertionError"."""
    if isinstance(e, AssertionError) and not str(e).strip():
        return (
            f"a request lm-eval cannot score (AssertionError: an empty context or answer, or an answer longer than "
            f"the window it runs in, {max_length or 'the model context'} tokens: --seq-len); raise --seq-len, or "
            "check the task's fields"
        )
    return _first_line(e)


def scores(results: dict) -> dict:
    """{task: {metric: value, num_samples, num_fewshot}} from simple_evaluate's results (numbers only)."""
    out = {}
    for task, metrics in results["results"].items():
        # finite numbers only: lm-eval's "N/A" stderr is a string, and a NaN one (a stderr of one document) would
        # make a report clakit report refuses (JSON NaN); both are "no value"
        row = {_metric(k): float(v) for k, v in metrics.items() if _finite(v) and "," in k}
        samples = results.get("n-samples", {}).get(task, {})
        if "effective" in samples:
            row["num_samples"] = samples["effective"]
        if task in results.get("n-shot", {}):
            row["num_fewshot"] = results["n-shot"][task]
        out[task] = row
    return out


def _finite(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _metric(key: str) -> str:
    name, _, filt = key.partition(",")
    return name if filt == "none" else key


def _version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def summary(lm_eval: dict) -> str:
    """`task: acc 0.612 ± 0.022, acc_norm ...` per task, one line each, for the CLI."""
    lines = []
    for task, row in lm_eval["tasks"].items():
        shown = [
            f"{k} {v:.4f}" + (f" ± {row[k + '_stderr']:.4f}" if k + "_stderr" in row else "")
            for k, v in row.items()
            if not k.endswith("_stderr") and k not in ("num_samples", "num_fewshot")
        ]
        lines.append(f"  lm-eval {task} ({row.get('num_samples', '?')} docs): {', '.join(shown)}")
    return "\n".join(lines)
