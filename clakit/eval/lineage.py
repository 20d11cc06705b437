"""Where an evaluated checkpoint came from, for the report's `provenance.origin`: the clakit record beside it
(`uptrain.json` of an uptrained model, `clakit_convert.json` of a conversion), summarised, with the record's path
and sha256 so the whole record can be found again. A report then names, per model, the source it was converted
from, at which revision, and the run that made it; none of this is in a label or a path."""

from pathlib import Path

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
