"""cli.py -- config dataclasses as command lines: `opt` declares a field with its --help text, `parse` builds one
subcommand per dataclass with one --flag per field and returns the chosen command and its config instance.
Shared by retu.py (sft, rl, eval, fit, demo) and curate.py (`retu.py data ...`)."""

from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING, field, fields


def opt(default=MISSING, help: str = ""):
    """A config field with its --help text (no default: the flag is required)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def add_flags(p: argparse.ArgumentParser, cls: type) -> None:
    """One --flag per field of dataclass `cls`: bool -> --x/--no-x, tuple[T, ...] of fixed length and list[T] ->
    several values, a field without default -> required."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        t, h = hints[f.name], f.metadata.get("help", "")
        kw = {"dest": f.name, "required": f.default is MISSING and f.default_factory is MISSING}
        if not kw["required"]:
            kw["default"] = f.default if f.default is not MISSING else f.default_factory()
            h = f"{h} (default: {kw['default']!r})"
        if t is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(t) is tuple:
            kw.update(type=typing.get_args(t)[0], nargs=len(typing.get_args(t)))
        elif typing.get_origin(t) is list:
            kw.update(type=typing.get_args(t)[0], nargs="+")
        else:
            kw["type"] = t
        p.add_argument("--" + f.name.replace("_", "-"), help=h.replace("%", "%%"), **kw)


def parse(prog: str, description: str, commands: dict[str, type], argv: list[str] | None) -> tuple[str, object]:
    """argv -> (command name, its config instance). A ValueError from the config's validation becomes an argparse
    error (usage line, exit status 2)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cls in commands.items():
        add_flags(sub.add_parser(name, help=(cls.__doc__ or name).split("\n")[0]), cls)
    args = vars(parser.parse_args(argv))
    cmd = args.pop("command")
    hints = typing.get_type_hints(commands[cmd])
    for k, v in args.items():
        if isinstance(v, list) and typing.get_origin(hints[k]) is tuple:
            args[k] = tuple(v)
    try:
        return cmd, commands[cmd](**args)
    except ValueError as e:
        parser.error(str(e))
