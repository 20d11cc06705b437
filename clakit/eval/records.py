"""Eval report files: written atomically by the file rule of clakit.outputs, read back with a check that they are
clakit reports."""

import json
import math
import os
from pathlib import Path

from clakit import outputs
from clakit.errors import ClakitError

FORMAT = "clakit-eval-report/1"
REQUIRED = (
    "model", "perplexity", "word_perplexity", "bits_per_byte", "num_tokens", "kv_cache", "settings", "data",
    "provenance",
)  # fmt: skip


LM_EVAL_KEYS = ("tasks", "settings", "version", "task_hashes")  # an lm_eval section's own keys (eval.harness)


LARGEST = 1e300  # beyond any measure a report holds; 1.7e308 overflowed the plot's axis limits (x 1.25: inf)


def _number(minimum: float, strict: bool = False, largest: float = LARGEST):
    """A finite int/float (not a bool) >= minimum (> minimum when strict), below `largest` in size."""

    def check(v) -> bool:
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and abs(v) < largest
        return ok and (v > minimum if strict else v >= minimum)

    return check


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _optional(check):
    return lambda v: v is None or check(v)


def _scores(v) -> bool:
    """lm_eval.tasks: {task: {metric: number}}."""
    return isinstance(v, dict) and all(
        isinstance(row, dict) and all(_number(-math.inf)(x) for x in row.values()) for row in v.values()
    )


def _task_hashes(v) -> bool:
    """lm_eval.task_hashes: {task: {"documents": sha256, "prompts": sha256}}."""
    return isinstance(v, dict) and all(
        isinstance(h, dict) and all(isinstance(x, str) for x in h.values()) for h in v.values()
    )


def _first_lm_eval(v) -> bool:
    """An lm_eval section without `tasks` or `settings` is the first format, {task: {metric: number}} itself. That
    format kept lm-eval's NaN (a stderr over one document): the table leaves it out (comparison.task_scores) rather
    than refuse a report clakit wrote."""
    return any(k in v for k in LM_EVAL_KEYS) or all(
        isinstance(row, dict) and all(isinstance(x, int | float) and not isinstance(x, bool) for x in row.values())
        for row in v.values()
    )


def _fraction(v) -> bool:
    return _number(0)(v) and v <= 1


def _list_of(check):
    return lambda v: isinstance(v, list) and bool(v) and all(check(x) for x in v)


def _passkey_grid(v) -> bool:
    """passkey.cells: one {length, depth, accuracy} per (length, depth) of passkey.settings (the heat map's grid); a
    cell twice only with one accuracy (the table's mean and the heat map read differing ones differently); a cell
    without a length was a KeyError, a list as length a TypeError."""
    cells = v.get("cells")
    if not (isinstance(cells, list) and all(_passkey_cell(c) for c in cells)):
        return False
    s, found = v["settings"], {}
    for c in cells:  # clakit before 12-04 wrote a depth given twice as two cells, of the same prompts and accuracy
        found.setdefault((c["length"], c["depth"]), set()).add(c["accuracy"])
    agree = all(len(accuracies) == 1 for accuracies in found.values())
    return agree and set(found) >= {(n, d) for n in s["lengths"] for d in s["depths"]} and _passkey_counts_agree(v)


def _whole(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and float(x).is_integer()


def _passkey_counts_agree(v) -> bool:
    """The numbers the table and heat map show agree with the counts beside them: each cell's accuracy is its
    correct / samples and the overall accuracy all cells' (an edited overall of 0.9 over cells averaging 0.44 was
    shown as 0.900). Cells without counts (none are written so; a hand-made grid) are not checked, where no cell has
    them: counts on some cells only, or counts that are not whole numbers 0 <= correct <= samples, are an edit (a
    float `correct`, or one cell's dropped, switched the whole check off)."""
    cells = v["cells"]
    if not any("correct" in c or "samples" in c for c in cells):
        return True
    if not all(_whole(c.get("samples")) and _whole(c.get("correct")) and 0 <= c["correct"] <= c["samples"]
               and c["samples"] > 0 for c in cells):  # fmt: skip
        return False
    if any(abs(c["accuracy"] - c["correct"] / c["samples"]) > 1e-9 for c in cells):
        return False
    total = sum(c["correct"] for c in cells) / sum(c["samples"] for c in cells)
    return not isinstance(v.get("accuracy"), int | float) or abs(v["accuracy"] - total) <= 1e-9


def _passkey_cell(cell) -> bool:
    if not isinstance(cell, dict):
        return False
    return _count(cell.get("length")) and _fraction(cell.get("depth")) and _fraction(cell.get("accuracy"))


# (keys, what it must be, check): what `clakit report` reads from a report. A field under an optional parent
# (speed, lm_eval, passkey) is checked only when the parent is there.
FIELDS = (
    (("model",), "a string", lambda v: isinstance(v, str)),
    (("perplexity",), "a number >= 1", _number(1)),
    # null: beyond a float (few words); up to 1.8e308 for text of few words (CJK, code): no plot reads it
    (("word_perplexity",), "a number >= 1 or null", _optional(_number(1, largest=math.inf))),
    (("bits_per_byte",), "a number >= 0", _number(0)),
    (("num_tokens",), "a positive integer", _count),
    (("kv_cache",), "a mapping", lambda v: isinstance(v, dict)),
    (("kv_cache", "bytes_per_token"), "a positive number", _number(0, strict=True)),
    (("kv_cache", "saving_factor"), "a positive number or null", _optional(_number(0, strict=True))),
    (("settings",), "a mapping", lambda v: isinstance(v, dict)),
    (("settings", "seq_len"), "a positive integer", _count),
    (("settings", "stride"), "a positive integer", _count),
    (("settings", "batch_size"), "a positive integer", _count),
    (("settings", "max_tokens"), "a positive integer or null", _optional(_count)),
    (("data",), "a mapping", lambda v: isinstance(v, dict)),
    (("data", "sources"), "a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
    (("data", "sha256"), "a string", lambda v: isinstance(v, str)),
    (("data", "fitted_on"), "a mapping of text and fitted file names, or null",
     _optional(lambda v: isinstance(v, dict) and all(isinstance(v.get(k), str) for k in ("text", "fitted")))),
    (("provenance",), "a mapping", lambda v: isinstance(v, dict)),
    (("speed",), "a mapping or null", _optional(lambda v: isinstance(v, dict))),
    (("speed", "prefill_tokens_per_s"), "a positive number", _number(0, strict=True)),
    (("speed", "decode_tokens_per_s"), "a positive number", _number(0, strict=True)),
    (("lm_eval",), "a mapping or null", _optional(lambda v: isinstance(v, dict))),
    (("lm_eval", "tasks"), "a mapping of task -> {metric: number}", _optional(_scores)),
    (("lm_eval",), "a mapping of task -> {metric: number} (its first format)", _optional(_first_lm_eval)),
    (("lm_eval", "settings"), "a mapping", _optional(lambda v: isinstance(v, dict))),
    (("lm_eval", "task_hashes"), "a mapping of task -> {documents, prompts}", _optional(_task_hashes)),
    (("passkey",), "a mapping or null", _optional(lambda v: isinstance(v, dict))),
    (("passkey", "accuracy"), "a number between 0 and 1", _fraction),
    (("passkey", "settings"), "a mapping", lambda v: isinstance(v, dict)),
    (("passkey", "prompts_sha256"), "a string or null", _optional(lambda v: isinstance(v, str))),  # older: none
    (("passkey", "settings", "lengths"), "a list of positive integers", _list_of(_count)),
    (("passkey", "settings", "depths"), "a list of numbers between 0 and 1", _list_of(_fraction)),
    (("passkey",), "a mapping whose cells hold one accuracy for every length and depth (correct / samples; overall: "
     "all cells')", _optional(_passkey_grid)),
)


def check_output(path, data=None) -> Path:
    """Before evaluating: `path` may receive a report (new, or a clakit report it replaces; its folder writable).
    `data`: the --data specs; a report read as text data passes the format check, but replacing it would destroy
    the input of the very run that writes it."""
    _file_name(path)
    # inside another output (a run's eval/ or model/, a converted folder) the report is a file that output's
    # --overwrite deletes with it (an uptrain run lists only its top-level names) or that blocks it
    outputs.check_not_inside_an_output(path, "output")
    path = outputs.check_file(path, FORMAT, noun="eval report", inputs=[("--data", data)])
    outputs.check_file_room(path)
    return path


def _file_name(path) -> None:
    """Refuse a path written as a folder (`-o out/`): Path() drops the trailing slash, so the report became a file
    named `out` where a folder was asked for."""
    if str(path).endswith(("/", os.sep)) and str(path).strip("/" + os.sep):
        raise ClakitError(f"output {path} names a folder; give a file name such as {path}report.json")


def write_json(report: dict, path) -> Path:
    """Write by clakit's file rule (clakit.outputs): a temp file beside `path`, then an atomic rename; only a new
    file or an earlier clakit report is replaced."""
    _file_name(path)
    return outputs.write_file(path, json.dumps(report, indent=2, sort_keys=False) + "\n", FORMAT, noun="eval report")


def read_report(path) -> dict:
    """A clakit eval report, or a one-line error saying why the file is not one."""
    path = Path(path)
    if path.exists() and not path.is_file():
        # a pipe (or `-` made one by the shell, <(...)) was opened and waited on forever; a folder was "not JSON"
        raise ClakitError(
            f"{path} is not a clakit eval report (not a regular file); give files written by `clakit eval -o`"
        )
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise ClakitError(f"report {path} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: JSON nested too deep
        raise ClakitError(
            f"{path} is not a clakit eval report (not readable JSON: {str(e)[:120]}); "
            "give files written by `clakit eval -o`"
        ) from None
    if not isinstance(report, dict) or report.get("format") != FORMAT:
        raise ClakitError(
            f"{path} is not a clakit eval report (no format {FORMAT!r}); give files written by `clakit eval -o`"
        )
    _check_text(report, path)
    missing = [k for k in REQUIRED if k not in report]
    if missing:
        raise ClakitError(f"{path} is not a complete clakit eval report (missing {', '.join(missing)})")
    _check_fields(report, path)
    return report


def _check_text(report: dict, path: Path) -> None:
    """JSON may hold a lone surrogate ("\\ud800"), which no UTF-8 file can: report.md failed to be written
    (UnicodeEncodeError, a traceback) after the checks."""
    try:
        json.dumps(report, ensure_ascii=False).encode()
    except UnicodeEncodeError as e:
        raise ClakitError(
            f"{path} is not a valid clakit eval report: it holds text that is not Unicode ({e.reason}, "
            f"{e.object[e.start:e.end]!r}); give files written by `clakit eval -o`"
        ) from None


def _check_fields(report: dict, path: Path) -> None:
    """Every field `clakit report` reads has the type and range `clakit eval` writes (a hand-edited or foreign file
    would otherwise fail deep in the table or the plot)."""
    for keys, what, check in FIELDS:
        parent = report
        for k in keys[:-1]:
            parent = parent.get(k) if parent is not None else None
        if parent is None:  # an optional parent (speed, lm_eval, passkey) that is not there
            continue
        value = parent.get(keys[-1])
        if not check(value):
            raise ClakitError(
                f"{path} is not a valid clakit eval report: {'.'.join(keys)} must be {what}, got {value!r:.80}; "
                "give files written by `clakit eval -o`"
            )
