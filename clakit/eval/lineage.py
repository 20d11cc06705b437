"""Where an evaluated checkpoint came from, for the report's `provenance.origin`: the clakit record beside it
(`uptrain.json` of an uptrained model, `clakit_convert.json` of a conversion), summarised, with the record's path
and sha256 so the whole record can be found again. A report then names, per model, the source it was converted
from, at which revision, and the run that made it; none of this is in a label or a path."""

import json
from dataclasses import dataclass
from pathlib import Path

from clakit.corpus import Text, load_texts, shared_text
from clakit.errors import ClakitError
from clakit.eval.kvcache import read_record
from clakit.provenance import CONVERT_RECORD, UPTRAIN_RECORD, file_sha256


def origin(model_dir: Path | None) -> dict | None:
    """{"made_by", "record", "record_sha256", ...the run's summary} of a checkpoint folder; None for a model no
    clakit run wrote (a stock checkpoint, a GGUF file, an in-memory model). An uptrained model's record is read
    first: it holds the conversion it started from."""
    for name, made_by, what, summarise in (
        (UPTRAIN_RECORD, "clakit uptrain", "an uptrain record", _uptrain),
        (CONVERT_RECORD, "clakit convert", "a conversion record", _conversion),
    ):
        record = read_record(model_dir, name, what)
        if record:
            path = Path(model_dir, name).absolute()
            return {"made_by": made_by, "record": str(path), "record_sha256": file_sha256(path), **summarise(record)}
    return None


def _mapping(record: dict, key: str) -> dict:
    value = record.get(key) if isinstance(record, dict) else None
    return value if isinstance(value, dict) else {}  # hand-edited or older records: a field may be missing


def _conversion(record: dict) -> dict:
    """Source (as given, and the local path it resolved to), revision, layout, init and the command of a convert
    record (`clakit_convert.json`)."""
    source, settings, prov = (_mapping(record, k) for k in ("source", "settings", "provenance"))
    return {
        "source": source.get("spec") or settings.get("source"),
        "source_path": source.get("path"),
        "revision": source.get("revision") or settings.get("revision"),  # a Hub source's: the commit read
        "source_sha256": source.get("sha256"),  # of the .gguf file, when the converter hashed one
        "kv_source_layers": settings.get("kv_source_layers"),
        "init": settings.get("init"),
        "calib_data": settings.get("calib_data"),  # the files read (a relative one: from `cwd`)
        "calib_sha256": settings.get("calib_sha256"),  # of the calibration text as read
        "command": prov.get("command"),
        "cwd": prov.get("cwd"),
        "created": prov.get("created"),
    }


def _uptrain(record: dict) -> dict:
    """The checkpoint training started from, its conversion, the original (teacher), steps and the command of an
    uptrain record (`uptrain.json`: provenance fields at its top level). A start uptrained before (an uptrained
    model/ as the next run's model.path) is summarised alike under `start_uptrain`, and so on down the chain: the
    report named the last run only, its steps read as all the training the model had."""
    conversion, earlier = _mapping(record, "conversion"), _mapping(record, "start_uptrain")
    model = _mapping(_mapping(record, "recipe"), "model")
    return {
        "start_checkpoint": record.get("start_checkpoint") or model.get("path"),
        "start_uptrain": _uptrain(earlier) if earlier else None,  # the runs before this one
        "conversion": _conversion(conversion) if conversion else None,
        "original": record.get("original") or model.get("source"),
        "steps": record.get("steps"),
        "kv_source_layers": record.get("kv_source_layers"),
        "command": record.get("command"),
        "cwd": record.get("cwd"),
        "created": record.get("created"),
    }


# --- the text a checkpoint was fitted on: held-out numbers must not be measured on it ------------------------------


def record_or_none(path: Path) -> dict | None:
    """A JSON record beside a checkpoint, None when absent or damaged (someone else's, an older clakit's)."""
    try:
        record = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


@dataclass
class FittedBefore:
    """The local text files a CLA checkpoint was fitted on, as its records name them (fitted_on)."""

    every: list[str]  # what held-out text must not be
    whole: list[str]  # those fitted on whole, which a held-out tail must not be cut from either


def fitted_on(folder: Path) -> FittedBefore:
    """The local text files the checkpoint in `folder` was fitted on, as its records name them, each resolved from
    the folder its run was in: its conversion's calibration text, and for a model uptrained by clakit, each run's
    training text down the chain (uptrain.json's `start_uptrain`). A run that held out the tail of its data.train
    trained on part of those files only: the same files and fraction again hold out the same tail, so they are not
    `whole`. Files no longer there, or not readable as names, are skipped (nothing to compare)."""
    whole = _calibrated_on(record_or_none(folder / CONVERT_RECORD))
    part, run, depth = [], record_or_none(folder / UPTRAIN_RECORD), 0
    while isinstance(run, dict) and depth < 100:  # each earlier run: its training text, the conversion it started from
        data = (run.get("recipe") or {}).get("data") if isinstance(run.get("recipe"), dict) else None
        trained = _located(run.get("train_data"), run.get("cwd"))
        held_given = isinstance(data, dict) and bool(data.get("eval"))  # else it held out part of its training text
        whole += _calibrated_on(run.get("conversion")) + (trained if held_given else [])
        part += trained
        run, depth = run.get("start_uptrain"), depth + 1
    return FittedBefore(list(dict.fromkeys(whole + part)), list(dict.fromkeys(whole)))


def _calibrated_on(record) -> list[str]:
    """A conversion record's calibration files (settings.calib_data, typed relative to provenance.cwd)."""
    if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
        return []
    cwd = (record.get("provenance") or {}).get("cwd") if isinstance(record.get("provenance"), dict) else None
    return _located(record["settings"].get("calib_data"), cwd)


def _located(names, cwd) -> list[str]:
    """The recorded text names that are local files or folders now, as absolute paths (relative ones from `cwd`); a
    name this user cannot resolve (`~nosuchuser/x`, too long, behind a folder it may not enter) is skipped, not a
    traceback."""
    found = []
    for name in names if isinstance(names, list) else []:
        if not isinstance(name, str) or not name.strip():
            continue
        try:
            path = Path(name).expanduser()
            path = Path(cwd) / path if not path.is_absolute() and isinstance(cwd, str) else path
            if path.is_absolute() and (path.is_file() or path.is_dir()):  # a folder: its .txt (readable)
                found.append(str(path))
        except (OSError, RuntimeError, ValueError):
            continue
    return found


def readable(paths: list[str]) -> list[Text]:
    """The recorded files that read as text now: one emptied, made binary or unreadable since is skipped."""
    texts = []
    for path in paths:
        try:
            texts += load_texts([path])
        except ClakitError:
            continue
    return texts


def fitted_text(folder: Path | None, texts: list[Text]) -> dict | None:
    """{"text", "fitted"}: the first of `texts` the checkpoint in `folder` was fitted on (by content: the same file,
    a copy under another name), with the fitted file its records name; None when none is (or no records). Scoring
    the training text is allowed (a training perplexity), but it must not read as held-out."""
    if folder is None:
        return None
    found = shared_text(texts, readable(fitted_on(Path(folder)).every))
    return {"text": found[0].name, "fitted": found[1]} if found else None
