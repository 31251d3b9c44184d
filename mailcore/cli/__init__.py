"""The `mailcore` admin command: users, keys, domains and the queue, from a shell.

It reads the same `--data-dir`, `--db` and `--config` as the daemon and builds the same Core
(`mailcore.service.build_core`: the data directory, the migrated store, the TLS pair), so
what it writes is what the daemon serves. Subcommands live in the modules of
`COMMAND_MODULES`; each has `register(subparsers)` and gives every command it adds a
`handler=async def handler(args, core) -> int` (and optionally `prepare=def prepare(args)`,
run before the reactor starts, for blocking terminal input such as a password prompt).

A mistake (bad option, unknown user, unreadable config, unreachable database ...) prints one
line on stderr and exits 1, in one style (`plain`): a refusal of a service names the option
that sets the field it is about (`in_cli_words`), not the API's name for it. Set
MAILCORE_DEBUG=1 to see the traceback of an unexpected error.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import os
import sys
import textwrap
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import wraps
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from sqlalchemy.exc import SQLAlchemyError
from twisted.internet import defer, task

from mailcore.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_toml,
    load_toml,
    refuse_empty,
)
from mailcore.identity import IdentityError
from mailcore.text import escape_controls, first_line

PROG = "mailcore"
COMMAND_MODULES = (
    "mailcore.cli.users",
    "mailcore.cli.domains",
    "mailcore.cli.queue",
    "mailcore.cli.billing",
    "mailcore.cli.webhooks",
    "mailcore.cli.mailboxes",
    "mailcore.cli.oauth",
    "mailcore.cli.jobs",
    "mailcore.cli.secrets",
)

Handler = Callable[[argparse.Namespace, Any], Awaitable[int]]
E = TypeVar("E", bound=Exception)


class CommandError(Exception):
    """A user mistake a handler reports: the message is printed as is, the exit status is 1."""


class UsageError(CommandError):
    """The command line itself is wrong."""


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help, wrapped between words only: a path such as /api-token-auth/ or a
    list such as sync.completed,email.new is never cut across two lines, where a reader
    copying it would take half of it."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent,
                             break_on_hyphens=False, break_long_words=False)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line and exit status 1, like every other error,
    and help is wrapped between words (HelpFormatter); every subcommand's parser is one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


# The most a --limit may ask for: past a 64-bit integer no database takes it as a number.
MAX_LIMIT = 2**63 - 1


def limit(text: str) -> int:
    """An argparse type: the number of rows a --limit asks for, 1 at least."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_LIMIT}, not {value}")
    return value


def check_text(argv: Sequence[str]) -> None:
    """Refuse an argument that is not UTF-8 (Python carries its bytes as lone surrogates,
    which every later step would fail to encode with a message naming no argument)."""
    for arg in argv:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            shown = repr(arg.encode("utf-8", "surrogateescape"))[1:]
            raise UsageError(f"argument {shown} is not UTF-8 text") from None


def build_parser() -> ArgumentParser:
    """The whole command line: global options and every available command module."""
    parser = ArgumentParser(
        prog=PROG,
        description="Administer a Mailcore installation: the daemon's data directory or "
        "database. Global options go before the command.",
    )
    parser.add_argument(
        "--data-dir", help="directory for the database, keys and certificates [default: ./var]"
    )
    parser.add_argument(
        "--files-dir", help="directory for uploaded files (safedrop's, the Mail API's) "
        "[default: the data directory]"
    )
    parser.add_argument(
        "--db", help="SQLAlchemy database URL [default: SQLite in the data directory]"
    )
    parser.add_argument(
        "-c", "--config", help="TOML configuration file; command-line options win over it"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # the module exists but one of its imports is missing
                raise
            continue
        module.register(subparsers)
    return parser


def resolve_config(args: argparse.Namespace) -> Config:
    """Defaults, then the TOML file, then the global options: the daemon's precedence."""
    config = Config()
    if args.config:
        config = config_from_toml(load_toml(Path(args.config)))
    overrides = {"data_dir": args.data_dir, "files_dir": args.files_dir, "db": args.db}
    refuse_empty(overrides, options=True)
    return apply_overrides(config, overrides)


def one_line(error: BaseException) -> str:
    """A short, single-line description of an error, for stderr."""
    if isinstance(error, SQLAlchemyError):
        orig = getattr(error, "orig", None)
        text = str(orig) if orig is not None else str(error)
        return f"database error: {first_line(text)}"
    if isinstance(error, IdentityError):
        return in_cli_words(error.message, error.field, IDENTITY_OPTIONS)
    if isinstance(error, OSError) and error.filename:
        return f"{error.strerror or error}: {error.filename}"
    return first_line(str(error)) or type(error).__name__


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Rows in aligned columns under a header line, on stdout. A cell's control characters
    are shown escaped: a next hop's reply or a user's label is never a terminal command."""
    rows = [[escape_controls(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    for row in (headers, *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def command_group(subparsers: Any, name: str, help: str, description: str | None = None) -> Any:
    """Add `mailcore NAME ACTION …` (ACTION required); returns the subparsers of its actions."""
    group = subparsers.add_parser(name, help=help, description=description)
    return group.add_subparsers(dest=f"{name}_command", metavar="ACTION", required=True)


def refusals(error: type[E], message: Callable[[E], str]) -> Callable[[Handler], Handler]:
    """A handler decorator: a service's `error` (a refused operation) is reported as
    `message(error)`, one line on stderr with exit status 1, like any CommandError."""

    def decorate(handler: Handler) -> Handler:
        @wraps(handler)
        async def run(args: argparse.Namespace, core: Any) -> int:
            try:
                return await handler(args, core)
            except error as e:
                raise CommandError(message(e)) from None

        return run

    return decorate


def utc_seconds(epoch: float | None) -> str:
    """A Unix time as UTC to the second, or "-"."""
    if epoch is None:
        return "-"
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


# The options that set the fields an IdentityError may name.
IDENTITY_OPTIONS = {"email": "--email", "password": "--password", "label": "--label"}


def in_cli_words(message: str, field: str | None = None,
                 options: Mapping[str, str] | None = None) -> str:
    """A service's refusal, worded for the API, in the CLI's words: the field it is about
    (`field`, or the message's first word) becomes the option or argument that sets it,
    from `options` (`redirectTo 'x': …` becomes `--redirect-to 'x': …`)."""
    names = options or {}
    key = field if field is not None and field in names else message.split(" ", 1)[0]
    name = names.get(key)
    if name is None:
        return message
    head, rest = message[:len(key)], message[len(key):]
    if head.lower() == key.lower() and not rest[:1].isalnum():  # "Label is too long"
        return name + rest
    return f"{name}: {plain(message)}"


def plain(message: str) -> str:
    """Every line in one style: no capital to start (an acronym stays), no full stop."""
    text = message.strip()
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1]
    first = text.split(" ", 1)[0]
    if first[:1].isupper() and (len(first) == 1 or first[1].islower()):
        text = text[:1].lower() + text[1:]
    return text


def fail(message: str) -> int:
    print(f"{PROG}: {plain(message)}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run one admin command; returns the exit status.

    What the command loaded and built (most of the product's modules, the schema, the
    Core) is frozen out of the garbage collector's sight when it returns (`gc.freeze`): the
    interpreter's exit then no longer walks those ~150,000 objects in its collections, which
    cost each command some 0.18 s of CPU. The process ends right after; nothing is kept."""
    try:
        return _main(argv)
    finally:
        gc.freeze()


def _main(argv: Sequence[str] | None) -> int:
    from twisted.internet import reactor

    from mailcore.startup import check_database_url, check_tables

    try:
        parser = build_parser()
        words = list(sys.argv[1:] if argv is None else argv)
        check_text(words)
        args = parser.parse_args(words)
        config = resolve_config(args)
        check_tables(config, reactor)  # every table, as the daemon checks them
        check_database_url(config)
        prepare = getattr(args, "prepare", None)
        if prepare is not None:
            prepare(args)
        handler: Handler = args.handler
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except (CommandError, ConfigError) as e:
        return fail(str(e))
    except (KeyboardInterrupt, EOFError):
        return fail("interrupted")

    from mailcore.privileges import as_data_dir_owner
    from mailcore.service import build_core

    # Root on the daemon user's data directory: that user (nothing root-owned left there).
    as_data_dir_owner(config.data_dir)
    try:
        # Blocks (creates the data dir, migrates): the reactor is not running yet.
        core = build_core(config, reactor)  # type: ignore[arg-type]
    except Exception as e:
        return _unexpected(e, where="cannot open the store")

    async def run(_reactor: Any) -> None:
        status = await _run_handler(handler, args, core)
        if status:
            raise SystemExit(status)

    try:
        task.react(lambda r: defer.Deferred.fromCoroutine(run(r)))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


async def _run_handler(handler: Handler, args: argparse.Namespace, core: Any) -> int:
    """Open the store, run the command, close the store; every error becomes one line."""
    try:
        try:
            await core.db.open()
        except Exception as e:
            return _unexpected(e, where="cannot open the store")
        return await handler(args, core)
    except (CommandError, ConfigError, IdentityError) as e:
        return fail(one_line(e))
    except Exception as e:
        return _unexpected(e)
    finally:
        core.cpu.stop()
        await core.db.close()


def _unexpected(error: BaseException, where: str | None = None) -> int:
    if os.environ.get("MAILCORE_DEBUG"):
        traceback.print_exception(error)
    if isinstance(error, ConfigError | CommandError):
        return fail(str(error))
    message = one_line(error)
    return fail(f"{where}: {message}" if where else message)
