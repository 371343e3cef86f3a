"""Typed dataclass configuration from command-line flags (and environment variables).

`add_dataclass_arguments(parser, Config, help)` makes one `--flag` per field (bools become
`--flag/--no-flag`); `dataclass_from_args(Config, args)` builds the config back. A field's
default can come from the environment: `env_prefix="RETRIEVAL_"` makes `RETRIEVAL_PORT=9000`
the default of `port`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from typing import Any


def _field_type(cls: type, f: dataclasses.Field) -> type:
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _env_default(f: dataclasses.Field, kind: type, env_prefix: str | None) -> Any:
    default = f.default if f.default is not dataclasses.MISSING else None
    if env_prefix:
        raw = os.environ.get(env_prefix + f.name.upper())
        if raw is not None:
            return raw.lower() in ("1", "true", "yes", "on") if kind is bool else kind(raw)
    return default


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, help: dict[str, str],
                            env_prefix: str | None = None, positional: tuple[str, ...] = ()) -> None:
    for f in dataclasses.fields(cls):
        kind = _field_type(cls, f)
        default = _env_default(f, kind, env_prefix)
        required = f.default is dataclasses.MISSING and default is None
        text = help.get(f.name, "")
        if env_prefix:
            text += f" [env {env_prefix}{f.name.upper()}]"
        if f.name in positional:
            parser.add_argument(f.name, type=kind, help=text)
        elif kind is bool:
            parser.add_argument(f"--{f.name.replace('_', '-')}", action=argparse.BooleanOptionalAction,
                                default=default, help=text)
        else:
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=default, required=required,
                                metavar=f.name.upper(), help=text + ("" if required else " (default: %(default)s)"))


def dataclass_from_args(cls: type, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def run_command(prog: str, args: argparse.Namespace, interrupted_hint: str = "") -> int:
    """Run `args.func(args)` for a CLI: a RetrievalError or OSError becomes one line on stderr
    and exit code 2 (never a traceback), Ctrl-C exit code 130."""
    import sys

    from retrieval.errors import RetrievalError

    try:
        return args.func(args)
    except (RetrievalError, OSError) as e:  # OSError: e.g. an unwritable output folder
        print(f"{prog} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog} {args.command}: interrupted{interrupted_hint}", file=sys.stderr)
        return 130
