"""Settings dataclasses as the single source of truth: their flags, their strict types.

A stage's settings are one dataclass (`ConvertConfig`, `EvalConfig`); each field's `metadata` holds its flag's help
and extra argparse options (`opt`). `add_arguments` makes one `--field-name` flag per field, `given` picks the fields
the parsed flags set (the stage's `config_from_args` builds the dataclass of them; flags not given keep the field
defaults), and `check_types` refuses a value
of the wrong type in one line, whether it came from a flag, a recipe or a library call.
"""

import argparse
import dataclasses
import os
import re
import reprlib
import types
import typing

from clakit.errors import ClakitError


def opt(help_: str, **flag) -> dict:
    """A field's metadata: its flag's help and extra argparse options (choices, metavar, group = a mutually
    exclusive group's title, section = the title of the --help section this field and the ones after it are in)."""
    return {"help": help_, "flag": flag}


def flag(name: str) -> str:
    return name.replace("_", "-")


_SHOWN = reprlib.Repr()  # keyword arguments only from Python 3.12
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlong = 3, 80, 80, 40
_SHOWN.maxlist = _SHOWN.maxdict = _SHOWN.maxset = _SHOWN.maxtuple = 6


def shown(value) -> str:
    """A value in a one-line message, cut short: a 50 MB string, or a few hundred bytes of nested YAML aliases that
    expand to 10**9 items (the value is shared, not copied, until repr() walks it), printed whole hung the run
    (helper U)."""
    return _SHOWN.repr(value)


def check_types(settings, noun: str) -> None:
    """Strict types for every field of the dataclass instance `settings`; ints are accepted where floats are, and a
    path object (pathlib.Path) where a str is: it is stored as its str (a library caller's `data=[Path(...)]` was
    refused as "must be list[str]", and a Path kept would not be JSON in the records)."""
    hints = typing.get_type_hints(type(settings))
    for f in dataclasses.fields(settings):
        object.__setattr__(settings, f.name, _paths_as_text(getattr(settings, f.name), hints[f.name]))
        value, tp = getattr(settings, f.name), hints[f.name]
        if not _fits(value, tp):
            raise ClakitError(f"{noun} setting {f.name} must be {_describe(tp)}, got {shown(value)}")


def _paths_as_text(value, tp):
    """`value` with os.PathLike in place of a str of `tp` (str, list[str], or a union holding them) as str."""
    members = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    if str in members and isinstance(value, os.PathLike):
        return os.fspath(value)
    if list[str] in members and isinstance(value, list | tuple):
        return [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value]
    return value


def _fits(value, tp) -> bool:
    """Whether `value` is of type `tp`: a plain type, list[T], or a union of them (`int | None`)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_fits(value, member) for member in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if typing.get_origin(tp) is list:
        inner = typing.get_args(tp)[0]
        return isinstance(value, list | tuple) and all(_is(v, inner) for v in value)
    return _is(value, tp)


def _is(value, tp) -> bool:
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, tp) and not (tp is int and isinstance(value, bool))


def _describe(tp) -> str:
    """`int`, `list[str] | None`: the type as written in the dataclass."""
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "").replace("NoneType", "None")


METAVARS = {int: "N", float: "F"}  # `--calib-tokens N`, as the docs write it (and `--passkey-depths F,F,...`)


def add_arguments(parser, cls) -> None:
    """One flag per field of the dataclass `cls`, `--field-name`; defaults stay the dataclass's (argparse.SUPPRESS).
    A field's `section` titles the --help section it and the fields after it are listed in (`group` is a mutually
    exclusive group's title: a section of its own)."""
    groups: dict[str, object] = {}
    hints = typing.get_type_hints(cls)
    section = parser
    for f in dataclasses.fields(cls):
        extra = dict(f.metadata["flag"])
        group = extra.pop("group", None)
        if "section" in extra:
            section = parser.add_argument_group(extra.pop("section"))
        target = section
        if group:
            if group not in groups:
                groups[group] = parser.add_argument_group(group).add_mutually_exclusive_group()
            target = groups[group]
        default = "" if f.default is None else f" (default {f.default})"
        kwargs = {"help": f.metadata["help"] + default, "default": argparse.SUPPRESS}
        kwargs |= _argparse_type(hints[f.name]) | extra  # a field's own metavar or choices win
        target.add_argument(f"--{flag(f.name)}", dest=f.name, **kwargs)


def _argparse_type(tp) -> dict:
    base = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
    if base is bool:
        return {"action": argparse.BooleanOptionalAction}
    if base == list[int]:
        return {}  # a string, parsed by the stage's from_args: a bad list is one `clakit: error:` line
    if typing.get_origin(base) is list:
        return {"nargs": "+", "action": "extend"}  # `--calib-data a b --calib-data c`: all three
    return {"type": base, **({"metavar": METAVARS[base]} if base in METAVARS else {})}


def given(args, cls) -> dict:
    """The fields of `cls` that parsed flags set (the others were suppressed: they keep the field defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def recipe_keys(message: str, cls, where: str) -> str:
    """`message` (a refusal of the dataclass `cls`, naming its CLI flags) as read in a recipe section `where`:
    `clakit uptrain` has no `--dtype`, so each flag the message names that is a field of `cls` is given its key,
    e.g. " (in the recipe: --dtype is model.convert.dtype)"."""
    names = {f.name for f in dataclasses.fields(cls)}

    def key(flag: str) -> str | None:  # --no-train-o-proj: train_o_proj set to false
        name = flag.replace("-", "_")
        if name in names:
            return f"{where}.{name}"
        return f"{where}.{name[3:]}: false" if name.startswith("no_") and name[3:] in names else None

    flags = {m: key(m) for m in re.findall(r"--([a-z][a-z0-9-]*)", message) if key(m)}
    if not flags:
        return message
    keys = ", ".join(f"--{f} is {k}" for f, k in flags.items())
    return f"{message} (in the recipe: {keys})"
