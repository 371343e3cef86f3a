"""Typed dataclass configuration from command-line flags (and environment variables).

`add_dataclass_arguments(parser, Config, help)` makes one `--flag` per field (bools become
`--flag/--no-flag`); `dataclass_from_args(Config, args)` builds the config back. A field's
default can come from the environment: `env_prefix="RETRIEVAL_"` makes `RETRIEVAL_PORT=9000`
the default of `port`. A flag and its variable are parsed by the same rules (`parse_value`);
an invalid variable is a `ConfigError` naming it, raised only when no flag overrides it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from typing import Any

from retrieval.errors import ConfigError

TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")
_KIND_NAMES = {int: "an integer", float: "a number", bool: f"a boolean ({'/'.join(TRUE_WORDS + FALSE_WORDS)})"}


def parse_value(kind: type, raw: str) -> Any:
    """`raw` as a `kind`: booleans accept only TRUE_WORDS and FALSE_WORDS (any case); ValueError
    on anything else."""
    if kind is bool:
        word = raw.strip().lower()
        if word in TRUE_WORDS or word in FALSE_WORDS:
            return word in TRUE_WORDS
        raise ValueError(f"{raw!r} is not {_KIND_NAMES[bool]}")
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{raw!r} is not {_KIND_NAMES.get(kind, kind.__name__)}") from None


@dataclasses.dataclass(frozen=True)
class FromEnv:
    """A default taken from an environment variable, parsed when the config is built (so that a
    flag given on the command line overrides an invalid variable)."""

    variable: str
    raw: str
    kind: type

    def value(self) -> Any:
        try:
            return parse_value(self.kind, self.raw)
        except ValueError as e:
            raise ConfigError(f"environment variable {self.variable}: {e}") from None

    def __str__(self) -> str:  # what --help shows as the default
        return f"{self.raw} (from {self.variable})"


def _field_type(cls: type, f: dataclasses.Field) -> type:
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _flag_type(kind: type):
    """argparse `type=` for a field: parse_value, with argparse's own one-line error on failure."""

    def parse(raw: str) -> Any:
        try:
            return parse_value(kind, raw)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = kind.__name__
    return parse


def _default(f: dataclasses.Field, kind: type, env_prefix: str | None) -> Any:
    if env_prefix:
        variable = env_prefix + f.name.upper()
        raw = os.environ.get(variable)
        if raw is not None:
            return FromEnv(variable, raw, kind)
    return f.default if f.default is not dataclasses.MISSING else None


def add_dataclass_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    help: dict[str, str],
    env_prefix: str | None = None,
    positional: tuple[str, ...] = (),
) -> None:
    for f in dataclasses.fields(cls):
        kind = _field_type(cls, f)
        default = _default(f, kind, env_prefix)
        required = f.default is dataclasses.MISSING and default is None
        text = help.get(f.name, "")
        if env_prefix:
            text += f" [env {env_prefix}{f.name.upper()}]"
        if f.name in positional:
            parser.add_argument(f.name, type=_flag_type(kind), help=text)
        elif kind is bool:
            parser.add_argument(
                f"--{f.name.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=default, help=text
            )
        else:
            parser.add_argument(
                f"--{f.name.replace('_', '-')}",
                type=_flag_type(kind),
                default=default,
                required=required,
                metavar=f.name.upper(),
                help=text + ("" if required else " (default: %(default)s)"),
            )


def dataclass_from_args(cls: type, args: argparse.Namespace):
    """The config `args` describe; a ConfigError names an invalid environment variable."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    return cls(**{k: v.value() if isinstance(v, FromEnv) else v for k, v in values.items()})


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit code 2), as every other
    configuration error of the CLIs is, instead of the whole usage text and then the error."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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
