"""`clakit report`: compare eval reports in a table (report.md), a plot of perplexity against KV-cache bytes per
token (ppl_vs_kv.png), passkey accuracy per length and depth as heat maps (passkey.png, when reports have it) and one
page with all (report.html). Runs on different data or settings are refused."""

import base64
import html
import json
import math
import os
from pathlib import Path

from clakit import outputs
from clakit.errors import ClakitError
from clakit.eval.records import LM_EVAL_KEYS, read_report
from clakit.markup import md_cell, md_text, visible
from clakit.paths import expand
from clakit.provenance import CONVERT_RECORD, REPORT_RECORD, file_sha256, provenance

# Fields that must agree for perplexities to be comparable. Not batch_size: the windows are scored alike at any
# batch (the same perplexity to the last digit at 1, 3 and 8), and a CLA model is evaluated at the larger batch its
# smaller cache allows; the speed note names differing batches, and the data note every batch size.
# The settings first: a different --max-tokens also scores other text (data.sha256), which was named instead, with a
# guess at the cause ("the files changed, or the tokenizers differ").
MUST_MATCH = (
    ("settings", "seq_len"),
    ("settings", "stride"),
    ("settings", "max_tokens"),
    ("data", "sha256"),
    ("num_tokens",),
)
# lm-eval scores are comparable when both runs scored the same documents with the same prompts.
# max_length: the windows of rolling loglikelihood and the truncation of long prompts; reports before it was recorded
# (null) ran lm-eval on the model's whole context, not on --seq-len windows (51.45 against 36.15 on one text).
LM_EVAL_MUST_MATCH = tuple(("lm_eval", "settings", k) for k in ("limit", "num_fewshot", "max_length"))
LM_EVAL_SKIP = ("num_samples", "num_fewshot")
# passkey accuracies are comparable when both runs asked the same prompts (lengths, depths, samples, seed).
PASSKEY_MUST_MATCH = (("passkey", "settings"),)
COLUMNS = [
    "model",
    "perplexity",
    "Δ% vs first",
    "bits/byte",
    "KV bytes/token",
    "saving ×",
    "prefill tok/s",
    "decode tok/s",
]


def _field(report: dict, keys: tuple) -> object:
    for k in keys:
        report = report.get(k) if isinstance(report, dict) else None
    return report


def check_comparable(reports: list[dict], paths: list) -> None:
    """Refuse, naming the first differing field, runs that were not made on the same data with the same settings.
    lm-eval and passkey settings are compared among the reports that have those sections (the first report may
    lack them while two later ones differ)."""
    for fields, section in ((MUST_MATCH, None), (LM_EVAL_MUST_MATCH, "lm_eval"), (PASSKEY_MUST_MATCH, "passkey")):
        having = [(r, p) for r, p in zip(reports, paths, strict=True) if section is None or r.get(section)]
        for report, path in having[1:]:
            for keys in fields:
                if keys == ("settings", "max_tokens") and _same_scored(having[0][0], report):
                    continue  # a --max-tokens beyond the text cut nothing: the same tokens were scored
                _check_field(having[0], (report, path), keys)
    _check_token_ids(reports, paths)
    _check_lm_eval_tasks(reports, paths)
    _check_passkey_prompts(reports, paths)


def _check_token_ids(reports: list[dict], paths: list) -> None:
    """The same text in as many tokens may still be other tokens: an edited tokenizer_config (another BOS), another
    tokenizers or sentencepiece version. data.ids_sha256 tells them apart; refused where both reports record it
    (reports written before it are compared by data.sha256 and num_tokens alone)."""
    having = [
        (r, p) for r, p in zip(reports, paths, strict=True) if isinstance(_field(r, ("data", "ids_sha256")), str)
    ]
    for report, path in having[1:]:
        first, theirs = having[0][0]["data"]["ids_sha256"], report["data"]["ids_sha256"]
        if theirs != first:
            raise ClakitError(
                f"cannot compare {path} with {having[0][1]}: data.ids_sha256 differs ({theirs[:12]} vs {first[:12]}): "
                "the same text was scored as other token ids (another tokenizer, tokenizer_config or tokenizers/"
                "sentencepiece version), so the perplexities are not one measurement; evaluate every model with the "
                "same tokenizer (bits/byte in each report compares across tokenizers)"
            )


def _same_scored(first: dict, other: dict) -> bool:
    """Both reports scored the same text in the same number of tokens (whatever --max-tokens each was given)."""
    return all(_field(first, k) == _field(other, k) is not None for k in (("data", "sha256"), ("num_tokens",)))


def _check_passkey_prompts(reports: list[dict], paths: list) -> None:
    """Passkey runs of equal settings asked other prompts when their filler texts differ past what perplexity scored
    (data.sha256 covers the scored tokens only): refused by the prompts' digest, where both reports hold one."""
    having = [(r, p) for r, p in zip(reports, paths, strict=True) if _field(r, ("passkey", "prompts_sha256"))]
    for report, path in having[1:]:
        first, theirs = _field(having[0][0], ("passkey", "prompts_sha256")), report["passkey"]["prompts_sha256"]
        if theirs != first:
            raise ClakitError(
                f"cannot compare {path} with {having[0][1]}: their passkey prompts differ (passkey.prompts_sha256 "
                f"{str(theirs)[:12]} vs {str(first)[:12]}: the filler comes from the evaluation text past the "
                "scored tokens, and that text differs); evaluate every model on the same --data"
            )


def _check_field(first: tuple[dict, object], other: tuple[dict, object], keys: tuple) -> None:
    """One field of two (report, path) pairs, compared as recorded: JSON's 0 and 0.0 are equal numbers in Python but
    not the same setting. A passkey depth is part of its prompts' seed string (`seed:length:depth:sample`): reports
    of clakit before passkey.unique_depths recorded depths as given, and [0, 1] asked other keys and filler than
    [0.0, 1.0] (lm-eval's limit 1 is a document count, 1.0 a fraction)."""
    a, b = _field(first[0], keys), _field(other[0], keys)
    if _as_recorded(a) == _as_recorded(b):
        return
    why = (
        " (equal numbers written differently, e.g. a passkey depth 0 vs 0.0, which seed other prompts)"
        if a == b
        else _same_files(first[0], other[0], keys)
    )
    fix = (
        "clakit report's table is perplexity per token, which no data or setting makes comparable across "
        "tokenizers: compare the reports' bits_per_byte"
        if "tokenizers differ, so" in why
        else "evaluate every model on the same data with the same settings"
    )
    raise ClakitError(
        f"cannot compare {other[1]} with {first[1]}: {'.'.join(keys)} differs ({b!r} vs {a!r}){why}; {fix}"
    )


def _same_files(first: dict, other: dict, keys: tuple) -> str:
    """Why the same text files read as other data: "evaluate every model on the same data" was all the refusal said
    to a user who had, with models of different tokenizers (other tokens for the same text, or with --max-tokens
    the first N of them covering other text)."""
    same_text = _field(first, ("data", "sha256")) == _field(other, ("data", "sha256"))
    if keys == ("num_tokens",) and same_text:
        return (
            " (the same text split into other tokens: the models' tokenizers differ, so perplexity per token does not "
            "compare; bits/byte in each report does)"
        )
    if keys == ("data", "sha256") and _field(first, ("data", "sources")) == _field(other, ("data", "sources")):
        return (
            " (the same files: they changed between the evaluations, or the models' tokenizers differ and the first "
            "--max-tokens tokens of each cover other text)"
        )
    return ""


def _as_recorded(value) -> str:
    return json.dumps(value, sort_keys=True)


def _check_lm_eval_tasks(reports: list[dict], paths: list) -> None:
    """One lm-eval task name is one column of the table: every report that has it must have scored the same
    documents with the same prompts (lm_eval.task_hashes; reports from before it are not checked)."""
    seen = {}  # task -> (its hashes, the first report that has them)
    for report, path in zip(reports, paths, strict=True):
        hashes = (report.get("lm_eval") or {}).get("task_hashes") or {}
        for task, mine in hashes.items():
            first, where = seen.setdefault(task, (mine, path))
            differ = [k for k in sorted(set(first) | set(mine)) if first.get(k) != mine.get(k)]
            if differ:
                raise ClakitError(
                    f"cannot compare {path} with {where}: lm-eval task {task} scored other {' and '.join(differ)} "
                    f"(lm_eval.task_hashes.{task}.{differ[0]} differs); score every model on the same task files "
                    "and data"
                )


def labels(reports: list[dict]) -> list[str]:
    """Short unique model names: the last path component, or as many trailing components as tell apart models whose
    paths end alike (every uptrain result is RUN/model: two runs were "model (1)" and "model (2)", nothing saying
    which is which); numbered only when the same model is given twice. Control and bidirectional characters are
    shown as escapes (markup.visible): the plot's labels too (a NUL is a missing glyph there)."""
    paths = [_path_parts(_location(r)) for r in reports]
    names = ["/".join(p[-_distinct_tail(p, paths) :]) or str(r["model"]) for p, r in zip(paths, reports, strict=True)]
    return [visible(f"{n} ({i + 1})" if names.count(n) > 1 else n) for i, n in enumerate(names)]


def _location(report: dict) -> str:
    """The model's path as typed, made absolute with the working directory its eval recorded: `clakit eval model`
    run in lr1e-4/ and in lr3e-4/ are two models, not one given twice (they were "model (1)" and "model (2)").
    A Hub id (it has a revision) and a path already absolute or under ~ stay as they are."""
    model, prov = str(report["model"]), report.get("provenance")
    prov = prov if isinstance(prov, dict) else {}
    record = (prov.get("origin") or {}).get("record") if isinstance(prov.get("origin"), dict) else None
    if not prov.get("model_path") and isinstance(record, str):  # an in-memory model: see _run_location
        return _run_location(model, record)
    cwd, hub = prov.get("cwd"), prov.get("revision") or prov.get("commit")
    if hub or not isinstance(cwd, str) or model.startswith(("/", "~")):
        return model
    return os.path.normpath(os.path.join(cwd, model))  # runs/../x is x


def _run_location(name: str, record: str) -> str:
    """An in-memory model's report (uptrain's eval/converted.json and uptrained.json: "model" is a name, the same in
    every run) placed in the run whose record names it (provenance.origin.record: RUN/model/uptrain.json,
    RUN/converted/clakit_convert.json): RUN/NAME. Two runs' uptrained.json were "uptrained (1)" and "uptrained (2)",
    nothing saying which run; now runs/a/uptrained and runs/b/uptrained, each label as short as tells them apart.
    A conversion's record names its own folder (RUN/converted, or the model.path a run started from: two runs from
    two conversions in one folder were both FOLDER/converted, one model given twice)."""
    if os.path.basename(record) == CONVERT_RECORD:
        return os.path.normpath(os.path.dirname(record))
    return os.path.normpath(os.path.join(os.path.dirname(os.path.dirname(record)), name))


def _path_parts(model) -> tuple[str, ...]:
    return tuple(part for part in str(model).split("/") if part)


def _distinct_tail(parts: tuple[str, ...], every: list[tuple[str, ...]]) -> int:
    """How many trailing components of `parts` no other (different) model path ends with."""
    k = 1
    while k < len(parts) and any(other != parts and other[-k:] == parts[-k:] for other in every):
        k += 1
    return k


def rows(reports: list[dict]) -> list[list[str]]:
    base = reports[0]["perplexity"]
    out = []
    for label, r in zip(labels(reports), reports, strict=True):
        kv, sp = r["kv_cache"], r.get("speed") or {}
        out.append(
            [
                label,
                f"{r['perplexity']:.3f}",
                f"{100 * (r['perplexity'] / base - 1):+.1f}%",
                f"{r['bits_per_byte']:.4f}",
                f"{kv['bytes_per_token']:,}",
                f"{kv['saving_factor']:.2f}" if kv.get("saving_factor") else "–",  # null: unknown, not 0×
                f"{sp['prefill_tokens_per_s']:.0f}" if sp else "–",
                f"{sp['decode_tokens_per_s']:.1f}" if sp else "–",
            ]
        )
    return out


def lm_eval_table(reports: list[dict]) -> tuple[list[str], list[list[str]]] | None:
    """(columns, rows) of the lm-eval scores, one column per task metric (`value ± stderr`), "–" where a run lacks
    it; None when no report has lm-eval scores."""
    scored = [task_scores(r.get("lm_eval") or {}) for r in reports]
    metrics = {}  # (task, metric) in first-seen order
    for tasks in scored:
        for task, row in tasks.items():
            metrics.update({(task, k): None for k in row if not k.endswith("_stderr") and k not in LM_EVAL_SKIP})
    if not metrics:
        return None
    columns = ["model"] + [f"{task} {metric}" for task, metric in metrics]
    out = []
    for label, tasks in zip(labels(reports), scored, strict=True):
        out.append([label] + [_score(tasks.get(task, {}), metric) for task, metric in metrics])
    return columns, out


def task_scores(lm_eval: dict) -> dict:
    """{task: {metric: value}} of a report's lm_eval section. The first reports with lm-eval scores (clakit of
    2026-11-25, before local tasks and their settings) held that mapping itself, no `tasks` key: their scores were
    dropped from the table without a word."""
    if any(k in lm_eval for k in LM_EVAL_KEYS):
        return lm_eval.get("tasks") or {}
    # its NaN scores are left out, as eval.harness leaves them out of new reports; its keys were lm-eval's own
    # ("acc,none", "acc_stderr,none"), named as eval.harness names them now ("acc", shown with its "± stderr")
    return {
        task: {k.removesuffix(",none"): x for k, x in row.items() if math.isfinite(x)} for task, row in lm_eval.items()
    }


def _score(row: dict, metric: str) -> str:
    if metric not in row:
        return "–"
    stderr = row.get(f"{metric}_stderr")
    return f"{row[metric]:.4f}" + (f" ± {stderr:.4f}" if isinstance(stderr, int | float) else "")


def _lm_eval_note(reports: list[dict]) -> str:
    lm = next(r["lm_eval"] for r in reports if r.get("lm_eval"))
    s = lm.get("settings") or {}
    shots = "each task's default" if s.get("num_fewshot") is None else s["num_fewshot"]
    docs = s.get("limit") or "all"
    version = lm.get("version") or "(version not recorded)"
    return f"lm-evaluation-harness {version}; documents per task: {docs}; few-shot: {shots}."


def passkey_note(reports: list[dict]) -> str:
    """What the passkey accuracies compare: the same prompts in every report that has them (check_comparable
    compared passkey.settings as recorded)."""
    s = next(r["passkey"] for r in reports if r.get("passkey"))["settings"]
    depths = ", ".join(map(str, s.get("depths") or []))
    return (
        f"Passkey prompts: lengths {', '.join(f'{n:,}' for n in s.get('lengths') or [])} tokens, depths {depths}, "
        f"{s.get('samples')} samples per cell, seed {s.get('seed')}: the same prompts for every model above "
        f"{'with passkey results ' if not all(r.get('passkey') for r in reports) else ''}"
        "(passkey.settings compared as recorded, depth 0 is not 0.0)."
    )


def passkey_table(reports: list[dict]) -> tuple[list[str], list[list[str]]] | None:
    """(columns, rows): overall passkey accuracy and per prompt length (mean over depths); "–" for runs without."""
    runs = [r.get("passkey") for r in reports]
    first = next((p for p in runs if p), None)
    if first is None:
        return None
    lengths = first["settings"]["lengths"]
    columns = ["model", "passkey accuracy"] + [f"{n:,} tokens" for n in lengths]
    out = []
    for label, p in zip(labels(reports), runs, strict=True):
        if not p:
            out.append([label] + ["–"] * (len(columns) - 1))
            continue
        per_length = [[c["accuracy"] for c in p["cells"] if c["length"] == n] for n in lengths]
        out.append([label, f"{p['accuracy']:.3f}"] + [f"{sum(a) / len(a):.3f}" for a in per_length])
    return columns, out


PANELS_MAX = 12  # more models than this: one matrix, a row per model (a panel each was 432 px per model wide:
# 69,264 px at 160 models, a 1.2 MB image in report.html)
PANELS_PER_ROW = 4
MATRIX_ROW_IN = 0.18  # inches per model row: 9-point labels stay readable
MATRIX_MAX_IN = (16.0, 60.0)  # (width, height) bound: past it cells shrink, the image does not grow


def _accuracy(p: dict) -> dict:
    """{(length, depth): accuracy} of one report's passkey section."""
    return {(c["length"], c["depth"]): c["accuracy"] for c in p["cells"]}


def accuracy_grid(p: dict, lengths: list, depths: list) -> list[list[float]]:
    """(depths, lengths) passkey accuracies of one report's passkey section, one row per depth."""
    cell = _accuracy(p)
    return [[cell[(n, d)] for n in lengths] for d in depths]


class _Figures:
    """`plt.subplots` without pyplot: a Figure of its own (saved by its Agg canvas), so a report leaves the caller's
    backend (a notebook's inline one), its open figures and pyplot's state as they were (matplotlib.use("Agg")
    switched a library caller's backend for the rest of the process)."""

    @staticmethod
    def subplots(*args, figsize=None, dpi=None, layout=None, **kwargs):
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize, dpi=dpi, layout=layout)
        return fig, fig.subplots(*args, **kwargs)


def heat_map(reports: list[dict], path: Path) -> None:
    """Passkey accuracy per (prompt length, needle depth): a panel per model, PANELS_PER_ROW to a row, up to
    PANELS_MAX models; more, one matrix with a row per model and a column per (length, depth), so the image's size
    stays bounded (check_comparable made every run's lengths and depths the same)."""
    runs = [(label, r["passkey"]) for label, r in zip(labels(reports), reports, strict=True) if r.get("passkey")]
    fig = _heat_panels(_Figures, runs) if len(runs) <= PANELS_MAX else _heat_matrix(_Figures, runs)
    fig.savefig(path)


def _heat_panels(figures, runs: list[tuple[str, dict]]):
    cols = min(len(runs), PANELS_PER_ROW)
    nrows = -(-len(runs) // cols)
    fig, axes = figures.subplots(
        nrows, cols, figsize=(1.2 + 3.6 * cols, 3.6 * nrows), dpi=120, squeeze=False, layout="constrained"
    )
    for ax, (label, p) in zip(axes.flat[: len(runs)], runs, strict=True):
        lengths, depths = p["settings"]["lengths"], p["settings"]["depths"]
        grid = accuracy_grid(p, lengths, depths)
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [f"{n:,}" for n in lengths], rotation=45, fontsize=8)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=8)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_title(f"{label}: {p['accuracy']:.2f}", fontsize=9, parse_math=False)  # a name, not mathtext
    for ax in axes.flat[len(runs) :]:  # the last row's empty places
        ax.axis("off")
    for row in axes:
        row[0].set_ylabel("needle depth")
    fig.colorbar(image, ax=axes.ravel().tolist(), label="passkey accuracy")
    return fig


def _heat_matrix(figures, runs: list[tuple[str, dict]]):
    """(models, lengths x depths) accuracies, one image: columns grouped by length, depths within."""
    lengths, depths = runs[0][1]["settings"]["lengths"], runs[0][1]["settings"]["depths"]
    matrix = [[cell[(n, d)] for n in lengths for d in depths] for cell in (_accuracy(p) for _, p in runs)]
    width = min(4.0 + 0.3 * len(lengths) * len(depths), MATRIX_MAX_IN[0])
    height = min(1.8 + MATRIX_ROW_IN * len(runs), MATRIX_MAX_IN[1])
    font = min(9.0, 72 * (height - 1.8) / len(runs) * 0.8)  # points per row, less a margin
    fig, ax = figures.subplots(figsize=(width, height), dpi=100, layout="constrained")
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", interpolation="nearest")
    ticks = [f"{n:,} / {d:.0%}" for n in lengths for d in depths]
    ax.set_xticks(range(len(ticks)), ticks, rotation=90, fontsize=7)
    names = [f"{label}: {p['accuracy']:.2f}" for label, p in runs]
    ax.set_yticks(range(len(runs)), names, fontsize=font)
    for tick in ax.get_yticklabels():
        tick.set_parse_math(False)  # a name, not mathtext
    ax.set_xlabel("prompt length (tokens) / needle depth")
    fig.colorbar(image, ax=ax, label="passkey accuracy")
    return fig


def _md_table(columns: list[str], body: list[list[str]]) -> list[str]:
    rule = "|" + "---|" * len(columns)
    rows = ["| " + " | ".join(map(md_cell, cells)) + " |" for cells in body]
    return ["| " + " | ".join(map(md_cell, columns)) + " |", rule, *rows]  # lm-eval's columns are task names


def _data_note(reports: list[dict]) -> str:
    s, d = reports[0]["settings"], reports[0]["data"]
    return (
        (
            f"Data: {', '.join(d['sources'])} ({reports[0]['num_tokens']:,} tokens scored, sha256 "
            f"{d['sha256'][:12]}); seq_len {s['seq_len']}, stride {s['stride']}, batch size {_batch_sizes(reports)}."
        )
        + _speed_note(reports)
        + _dtype_note(reports)
        + _saving_note(reports)
        + _window_note(reports)
        + _lineage_note(reports)
        + _baseline_note(reports)
        + _fitted_note(reports)
    )


def _baseline_note(reports: list[dict]) -> str:
    """Rows made (converted, or uptrained from a conversion) from another model than the first row's: their
    "Δ% vs first" is not what the conversion cost, and their "saving ×" is against their own source, not the
    first row. `clakit eval --source-model` and uptrain's model.original refuse such a pair; the report names it."""
    first = reports[0]["provenance"].get("model_path")
    if not isinstance(first, str):
        return ""
    names, notes = labels(reports), []
    for name, r in zip(names[1:], reports[1:], strict=True):
        origin = r["provenance"].get("origin")
        if not isinstance(origin, dict):
            continue
        conversion = origin.get("conversion") if origin.get("made_by") == "clakit uptrain" else origin
        source = (conversion or {}).get("source_path") if isinstance(conversion, dict) else None
        if isinstance(source, str) and source != first and first not in _starts(origin):
            notes.append(f"{name} was converted from {source}, not from the first row's {first}")
    if not notes:
        return ""
    return (
        " " + "; ".join(notes) + ": its Δ% vs first is not what its conversion cost, and its saving × is against its "
        "own source; put the model it was converted from first."
    )


def _starts(origin: dict) -> list:
    """The start checkpoints of an uptrained model's run and of each earlier run down its chain (start_uptrain): a
    model uptrained twice from a conversion starts, two runs down, from that conversion (helper 50r)."""
    starts = []
    for _ in range(100):  # a chain is a few runs long; a hand-made loop in a record is not followed for ever
        if not isinstance(origin, dict):
            break
        starts.append(origin.get("start_checkpoint"))
        origin = origin.get("start_uptrain")
    return starts


def _fitted_note(reports: list[dict]) -> str:
    """Rows scored on text their model was fitted on (data.fitted_on): the table read as held-out numbers."""
    notes = [
        f" {name} was fitted on this text ({fitted['text']} is {fitted['fitted']}, named in its records): its "
        "perplexity is not held out."
        for name, r in zip(labels(reports), reports, strict=True)
        if isinstance(fitted := r["data"].get("fitted_on"), dict)
    ]
    return "".join(notes)


def _window_note(reports: list[dict]) -> str:
    """KV bytes/token (the table and the plot) counts every token; a sliding-window layer keeps only its window, so
    the cache one sequence of seq_len holds (kv_cache.bytes_per_sequence) is below bytes/token x seq_len: a windowed
    Mistral read as holding the cache of a full-attention Llama of the same layout."""
    seq_len = reports[0]["settings"]["seq_len"]
    windowed = []
    for name, r in zip(labels(reports), reports, strict=True):
        kv = r["kv_cache"]
        per_seq = kv.get("bytes_per_sequence_decoding", kv.get("bytes_per_sequence"))
        if isinstance(per_seq, int | float) and not isinstance(per_seq, bool):
            if per_seq < kv["bytes_per_token"] * seq_len:
                windowed.append(f"{name} {per_seq:,} bytes, not {kv['bytes_per_token'] * seq_len:,}")
    if not windowed:
        return ""
    return (
        f" Sliding-window layers keep only their window: the cache of one {seq_len:,}-token sequence holds "
        f"{'; '.join(windowed)} once decoding is past the window (kv_cache.bytes_per_sequence_decoding; right after "
        "its prefill it holds every token): KV bytes/token does not show it."
    )


def _saving_note(reports: list[dict]) -> str:
    """ "saving ×" is each row's against its own reference (kv_cache.source: --source-model, the converter's source,
    or the same layout all producers): one model evaluated with and without --source-model read 2.00 and 1.00 in one
    table, unexplained. Named where rows of one model have different savings (one reference spelled two ways, a
    relative and an absolute path, was named as two)."""
    by_model: dict[str, list[tuple[str, str, object]]] = {}
    for name, r in zip(labels(reports), reports, strict=True):
        model, kv = str(r["provenance"].get("model_path") or r.get("model")), r.get("kv_cache") or {}
        by_model.setdefault(model, []).append((name, str(kv.get("source")), kv.get("saving_factor")))
    differ = [rows for rows in by_model.values() if len({saving for *_, saving in rows}) > 1]
    if not differ:
        return ""
    named = "; ".join(f"{name} against {src}" for rows in differ for name, src, _ in rows)
    return (
        f" saving × is each row's KV bytes against its own reference, and rows of one model have different ones "
        f"({named}): compare the KV bytes/token column."
    )


def _lineage_note(reports: list[dict]) -> str:
    """An uptrained model whose start checkpoint is another row of the report, replaced since the run read it (a
    conversion or a run repeated into the same folder with --overwrite): both rows name one path, so the table read
    as "this model, then trained"; the note says the row is a later model than the one training started from."""
    names = labels(reports)
    paths = [r["provenance"].get("model_path") for r in reports]  # None: a model scored in memory
    rows = {path: (name, r) for path, name, r in zip(paths, names, reports, strict=True) if isinstance(path, str)}
    notes = []
    for name, r in zip(names, reports, strict=True):
        origin = r["provenance"].get("origin")
        if not isinstance(origin, dict) or origin.get("made_by") != "clakit uptrain":
            continue
        start = origin.get("start_checkpoint")
        row, start_report = rows.get(start, (None, {})) if isinstance(start, str) else (None, {})
        then = origin.get("start_uptrain") or origin.get("conversion")  # the start's record as the run read it
        now = (start_report.get("provenance") or {}).get("origin")
        if _replaced(then, now):
            notes.append(
                f" {name} was trained from {start} as a run made it at {then['created']}; the "
                f"row {row} is a later run's output in that folder (made at {now['created']}), not the model {name} "
                "started from."
            )
    return "".join(notes)


def _replaced(then, now) -> bool:
    """Whether two lineage summaries of one folder name different runs (both dated: older records say nothing)."""
    dated = all(isinstance(x, dict) and x.get("created") for x in (then, now))
    return dated and _made_at(then) != _made_at(now)


def _made_at(summary: dict) -> tuple:
    """(created, command, cwd) of a lineage summary: which run wrote the record, not only where."""
    return tuple(summary.get(k) for k in ("created", "command", "cwd"))


def _batch_sizes(reports: list[dict]) -> str:
    """The windows' batch size, or each model's where they differ (they do not change the perplexity)."""
    sizes = [r["settings"]["batch_size"] for r in reports]
    if len(set(sizes)) == 1:
        return str(sizes[0])
    return ", ".join(f"{size} ({label})" for label, size in zip(labels(reports), sizes, strict=True))


def _dtype_note(reports: list[dict]) -> str:
    """KV bytes/token of an fp32 and a bf16 cache differ 2x with the same layout: say so when dtypes differ."""
    # a report without kv_cache.dtype (not one records.FIELDS requires) is unknown, not a dtype named "None"
    dtypes = list(dict.fromkeys(str(r["kv_cache"]["dtype"]) for r in reports if r["kv_cache"].get("dtype")))
    cache = f" KV caches of different dtypes ({', '.join(dtypes)}): part of the bytes/token difference is precision."
    return (cache if len(dtypes) > 1 else "") + _weights_note(reports)


def _weights_note(reports: list[dict]) -> str:
    """Perplexities scored with bf16 and fp32 weights differ by precision (+0.11% on SmolLM2's CLA2, docs/eval.md):
    the note named only the cache, so a model run in bf16 beside one in fp32 read as a quality difference."""
    dtypes = list(dict.fromkeys(str(r["provenance"]["dtype"]) for r in reports if r["provenance"].get("dtype")))
    if len(dtypes) < 2:
        return ""
    timed = any(r.get("speed") for r in reports)  # a 16-bit matmul on a CPU: 15-45x fp32's time, measured
    also = " and tok/s differ by precision too" if timed else " differ by precision too"
    return f" The models ran in different dtypes ({', '.join(dtypes)}): their perplexities{also}."


def _machine(report: dict, cpu_named: bool = True) -> str:
    """The device that timed `report`: a CPU by its model name where `cpu_named` (every report records one:
    provenance.cpu, since 12-06; a report without it against one with it read as "different machines")."""
    prov = report["provenance"]
    name = str(prov.get("device_name") or prov.get("device") or "unknown device")
    threads, model = prov.get("torch_threads"), prov.get("cpu")
    if name != "cpu":
        return name
    name = f"cpu: {model}" if cpu_named and isinstance(model, str) and model else name
    return f"{name} ({threads} {'thread' if threads == 1 else 'threads'})" if threads else name


def _speed_note(reports: list[dict]) -> str:
    """Perplexities compare across machines, tokens/s do not: say so when the speeds were timed on different ones,
    or with different prefill lengths, batches or decode steps."""
    timed = [r for r in reports if r.get("speed")]
    named = all(isinstance(r["provenance"].get("cpu"), str) for r in timed)
    machines = list(dict.fromkeys(_machine(r, named) for r in timed))
    timings = list(dict.fromkeys(_timing(r["speed"]) for r in timed))
    note = ""
    if len(machines) > 1:
        note += f" Speeds were timed on different machines ({'; '.join(machines)}): compare tok/s only within one."
    if len(timings) > 1:
        # clakit eval decodes 16 steps, the demo 8; a model with a shorter window prefills fewer tokens
        note += f" Speeds were timed differently ({'; '.join(timings)}): tok/s are not comparable across them."
    busy = [f"{name} ({why})" for name, r in zip(labels(reports), reports, strict=True)
            if r.get("speed") and (why := _busy(r))]  # fmt: skip
    if busy:
        note += (f" Speeds timed on a busy machine: {'; '.join(busy)}: their tok/s measure the machine's load, not "
                 "the model; compare models interleaved in one run (benchmarks/checkpoint_speed.py in clakit's source "
                 "tree: not installed with the package).")
    return note


def _busy(report: dict) -> str | None:
    """Why `report`'s speeds are not the model's, where it recorded its passes (speed.passes_s, since 2026-12-07):
    decode passes differing by over 1.5x (helper S2 measured 0.46-2.5 tok/s passes of one model beside a CI run).
    cpu_share and the load average are recorded and shown, not judged: a small model's Python-bound decode leaves
    threads idle on an idle machine too."""
    speed = report["speed"]
    passes = speed.get("passes_s") or []
    decode = [p[1] for p in passes if isinstance(p, list) and len(p) == 2 and _positive(p[1])]
    if len(decode) < 2 or max(decode) / min(decode) <= 1.5:
        return None
    load = speed.get("load_average")
    load = f", load average {load} on {speed.get('cpus')} CPUs" if _positive(load) else ""
    return f"decode passes {min(decode):.3g}-{max(decode):.3g} s{load}"


def _positive(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _timing(speed: dict) -> str:
    return (
        f"prefill {_prefill_length(speed)} tokens x {speed.get('batch_size')}, "
        f"{speed.get('decode_steps')} decode steps"
    )


def _prefill_length(speed: dict):
    """Tokens per sequence prefilled. Reports written before speed.prefill_length (clakit before 2026-12-04)
    prefilled the whole batch of prefill_tokens = batch x length: the length is their quotient, not unknown."""
    length, tokens, batch = (speed.get(k) for k in ("prefill_length", "prefill_tokens", "batch_size"))
    if length is None and isinstance(tokens, int) and isinstance(batch, int) and batch > 0:
        return tokens // batch
    return length


def sources_table(reports: list[dict], paths: list) -> tuple[list[str], list[list[str]]]:
    """Where each row came from: its report file, the model as it was evaluated (Hub id, else the absolute path read;
    reports before provenance.model_path give the path as typed), its revision, the clakit run that made it
    (`made_from`) and the versions that evaluated it. A label is the end of a path: alone, it finds nothing again."""
    columns = ["model", "evaluated", "revision", "report file", "clakit / transformers / torch", "made from"]
    body = []
    for label, r, path in zip(labels(reports), reports, paths, strict=True):
        prov = r["provenance"]
        versions = " / ".join(str(prov.get(k)) for k in ("clakit", "transformers", "torch"))
        hub = prov.get("revision") or prov.get("commit")  # a Hub id names it better than its cache snapshot folder
        evaluated = str((None if hub else prov.get("model_path")) or prov.get("model") or r["model"])
        revision = str(prov.get("revision") or "–")
        body.append([label, evaluated, revision, str(Path(path).absolute()), versions, made_from(prov.get("origin"))])
    return columns, body


def made_from(origin) -> str:
    """One line of a report's provenance.origin (clakit.eval.lineage): the conversion, or the uptraining and the
    conversion it started from; "–" for a model no clakit run made (or a report from before origin was recorded)."""
    if not isinstance(origin, dict):
        return "–"
    if origin.get("made_by") != "clakit uptrain":
        return _converted(origin)
    conversion, text = origin.get("conversion"), _uptrained(origin)
    earlier = origin.get("start_uptrain")
    while isinstance(earlier, dict):  # an uptrained model trained again: every run, the latest first
        text += f", after {_uptrained(earlier)}"
        earlier = earlier.get("start_uptrain")
    return text + (f", {_converted(conversion)}" if isinstance(conversion, dict) else "")


def _uptrained(origin: dict) -> str:
    return f"clakit uptrain ({origin.get('steps')} steps) of {origin.get('start_checkpoint')}"


def _converted(conversion: dict) -> str:
    """The conversion, with what tells two of one source apart (a folder converted again with --overwrite: two rows
    of one path and the same line): its init, layout and time."""
    at = f" at revision {conversion['revision']}" if conversion.get("revision") else ""
    layout = conversion.get("kv_source_layers")
    details = [f"init {conversion['init']}" if conversion.get("init") else None,
               f"layout {','.join(map(str, layout))}" if isinstance(layout, list) else None,
               str(conversion["created"]) if conversion.get("created") else None]  # fmt: skip
    how = f" ({'; '.join(d for d in details if d)})" if any(details) else ""
    return f"clakit convert{how} of {conversion.get('source_path') or conversion.get('source')}{at}"


def _made_by() -> str:
    """This report's own provenance: the command, where and when it ran, the versions that wrote it."""
    p = provenance()
    return (
        f"Written by {p['command']} in {p['cwd']} at {p['created']} "
        f"(clakit {p['clakit']}, transformers {p['transformers']}, torch {p['torch']})."
    )


def _md_sources(reports: list[dict], paths: list | None) -> str:
    if paths is None:
        return ""
    columns, body = sources_table(reports, paths)
    # a list, not a table: report.md's tables are its results (readers take every `| ` line of it for a model)
    items = ["- " + "; ".join(f"{c}: {md_text(v)}" for c, v in zip(columns, row, strict=True)) for row in body]
    return "\n## Sources\n\n" + "\n".join(items) + f"\n\n{md_text(_made_by())}\n"


def markdown(reports: list[dict], paths: list | None = None) -> str:
    """The report's text; `paths` (the report files, in order) adds the Sources section."""
    table = "\n".join(_md_table(COLUMNS, rows(reports)))
    text = f"# clakit eval report\n\n{table}\n\n{md_text(_data_note(reports))}\n"
    table = passkey_table(reports)
    if table:
        note = md_text(passkey_note(reports))
        text += (
            "\n## Passkey retrieval\n\n" + "\n".join(_md_table(*table)) + f"\n\n{note}\n\n![passkey](passkey.png)\n"
        )
    table = lm_eval_table(reports)
    if table:
        note = md_text(_lm_eval_note(reports))
        text += "\n## lm-eval tasks\n\n" + "\n".join(_md_table(*table)) + "\n\n" + note + "\n"
    return text + "\n![perplexity vs KV bytes](ppl_vs_kv.png)\n" + _md_sources(reports, paths)


LABELS_MAX = 20  # more models than this: only the frontier is named (160 names were one unreadable block of text)


def labelled(xs: list, ys: list) -> list[int]:
    """Indices of the points plot() names: every one up to LABELS_MAX; beyond, the Pareto front (no other model has
    at most the KV bytes and a lower perplexity, or fewer bytes and at most the perplexity), its LABELS_MAX lowest
    perplexities. The table names every model."""
    if len(xs) <= LABELS_MAX:
        return list(range(len(xs)))
    pairs = list(zip(xs, ys, strict=True))
    front = [i for i, (x, y) in enumerate(pairs) if not any(a <= x and b <= y and (a, b) != (x, y) for a, b in pairs)]
    return sorted(sorted(front, key=lambda i: ys[i])[:LABELS_MAX])


def plot(reports: list[dict], path: Path) -> None:
    """Perplexity (log scale when it spans 10x) against KV-cache bytes per token, one labelled point per model."""
    xs = [r["kv_cache"]["bytes_per_token"] for r in reports]
    ys = [r["perplexity"] for r in reports]
    fig, ax = _Figures.subplots(figsize=(6.4, 4.4), dpi=120)
    ax.scatter(xs, ys, s=60 if len(xs) <= LABELS_MAX else 20, zorder=3)
    names, shown = labels(reports), labelled(xs, ys)
    for i in shown:
        # parse_math=False: a name holding `$...$` is a name, not mathtext (`m$\x$` raised, aborting the report)
        ax.annotate(names[i], (xs[i], ys[i]), textcoords="offset points", xytext=(6, 6), fontsize=9, parse_math=False)
    log = max(ys) / min(ys) > 10
    if log:
        ax.set_yscale("log")
    ax.set_xlim(0, max(xs) * 1.25)
    ax.set_xlabel("KV-cache bytes per token")
    ax.set_ylabel("perplexity, lower is better" + (" (log scale)" if log else ""))
    front = "" if len(shown) == len(xs) else f" (named: {len(shown)} of {len(xs)}, the best at their size)"
    ax.set_title("Perplexity vs KV-cache size" + front, fontsize=12 if not front else 10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def _html_table(columns: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(visible(c))}</th>" for c in columns)
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(visible(c))}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><tr>{head}</tr>{cells}</table>"


def _html_lm_eval(reports: list[dict]) -> str:
    table = lm_eval_table(reports)
    if not table:
        return ""
    return f"<h2>lm-eval tasks</h2>{_html_table(*table)}<p>{html.escape(_lm_eval_note(reports))}</p>"


def _html_passkey(reports: list[dict], png: Path) -> str:
    table = passkey_table(reports)
    if not table:
        return ""
    image = base64.b64encode(png.read_bytes()).decode()
    return (
        f"<h2>Passkey retrieval</h2>{_html_table(*table)}<p>{html.escape(passkey_note(reports))}</p>"
        f"<img alt='passkey accuracy per length and depth' src='data:image/png;base64,{image}'>"
    )


def _html_sources(reports: list[dict], paths: list | None) -> str:
    if paths is None:
        return ""
    table = _html_table(*sources_table(reports, paths))
    return f"<h2>Sources</h2>{table}<p><small>{html.escape(_made_by())}</small></p>"


def page(reports: list[dict], png: Path, paths: list | None = None) -> str:
    """report.html; `paths` (the report files, in order) adds the Sources section."""
    image = base64.b64encode(png.read_bytes()).decode()
    note = html.escape(visible(_data_note(reports)))
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>clakit eval report</title><style>"
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}td:first-child{text-align:left}</style>"
        f"</head><body><h1>clakit eval report</h1>{_html_table(COLUMNS, rows(reports))}<p>{note}</p>"
        f"<img alt='perplexity vs KV-cache bytes per token' src='data:image/png;base64,{image}'>"
        f"{_html_passkey(reports, png.parent / 'passkey.png')}{_html_lm_eval(reports)}{_html_sources(reports, paths)}"
        "</body></html>\n"
    )


def report(paths: list, out_dir) -> Path:
    """report.md, ppl_vs_kv.png and report.html comparing `paths` (the first is the baseline); returns out_dir."""
    if not paths:
        raise ClakitError("give at least one eval report (.json written by `clakit eval -o`)")
    paths = [expand(p, "report") for p in paths]
    out_dir = expand(out_dir, "output folder")
    # a report folder clakit wrote is replaced without a flag (as `clakit eval -o` replaces its report file)
    out_dir = outputs.check_folder(out_dir, "report", overwrite=True, inputs=[("report", paths)])
    reports = [read_report(p) for p in paths]
    check_comparable(reports, paths)
    # reports/a/b/out: a failed report leaves no empty reports/a/b
    with outputs.new_parents_removed_on_failure(out_dir), outputs.staged(out_dir, "report", overwrite=True) as tmp:
        (tmp / "report.md").write_text(markdown(reports, paths))
        plot(reports, tmp / "ppl_vs_kv.png")
        if any(r.get("passkey") for r in reports):
            heat_map(reports, tmp / "passkey.png")
        (tmp / "report.html").write_text(page(reports, tmp / "ppl_vs_kv.png", paths))
        (tmp / REPORT_RECORD).write_text(json.dumps(report_record(paths), indent=1) + "\n")
    return out_dir


def report_record(paths: list[Path]) -> dict:
    """The report folder's own record: each eval report it read (absolute path and sha256: the files can change or
    move after), the command, cwd, time and versions. The folder named its sources in report.md's prose only."""
    return provenance(reports=[{"path": str(p.absolute()), "sha256": file_sha256(p)} for p in paths])
