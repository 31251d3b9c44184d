"""README.md names what the code has: every package and module in its architecture, every
admin command in its command table, every table of the TOML file and every daemon option in
its configuration reference. A package, command, table or option added without its line
in README fails here (the node registry's package went without its row for a while)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import re
import tokenize
import tomllib
from pathlib import Path
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import TestCase

from mailcore.cli import build_parser
from mailcore.config import Config, ConfigError, DaemonOptions
from mailcore.startup import TABLES

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    """The text of README's `## title` section, up to the next `## `."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.S | re.M)
    assert match is not None, title
    return match.group(1)


def table_rows(text: str, first_cell: str) -> list[str]:
    """The rows of the Markdown tables in `text` whose first cell starts with `first_cell`."""
    return [line for line in text.splitlines() if line.startswith(f"| {first_cell}")]


# Keys whose value in a module's example is not the default, and why.
EXAMPLE_ONLY = {
    "store": ("read_threads",),  # its default depends on the database: 1 SQLite, 2 PostgreSQL
}


def prose(path: Path) -> str:
    """The docstrings and comments of a module: what a reader of it is told."""
    source = path.read_text(encoding="utf-8")
    parts = [ast.get_docstring(node) or "" for node in ast.walk(ast.parse(source))
             if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef
                           | ast.AsyncFunctionDef)]
    parts += [t.string for t in tokenize.generate_tokens(io.StringIO(source).readline)
              if t.type == tokenize.COMMENT]
    return "\n".join(parts)


def documented_in(table: str) -> list[Path]:
    """The modules the configuration table's row for `[table]` names."""
    rows = table_rows(section("Configuration"), "`[")
    row = [r for r in rows if re.match(rf"\| `\[{table}[\].]", r)][-1]
    return [ROOT / m for m in re.findall(r"`((?:mailcore|web|filters)/[\w/]+\.py)`", row)]


def accepted_keys(table: str) -> list[str]:
    """The keys `[table]` takes: the fields of the settings its reader builds that the
    reader does not refuse as unknown."""
    reactor = MemoryReactorClock()
    built = TABLES[table](Config(), reactor)
    settings = [s for s in (built if isinstance(built, tuple) else (built,))
                if dataclasses.is_dataclass(s)]
    return [f.name for s in settings for f in dataclasses.fields(s)
            if not refused_as_unknown(table, f.name, reactor)]


def refused_as_unknown(table: str, key: str, reactor: MemoryReactorClock) -> bool:
    try:
        TABLES[table](Config(sections={table: {key: None}}), reactor)
    except ConfigError as e:
        return "unknown key" in str(e)  # else a complaint about the value: the key is taken
    return False


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


# A JSON string (its brackets and separators are text).
JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def json_examples(text: str) -> list[str]:
    """README's JSON examples: the comments of its code blocks (a `{` or `[` left open goes
    on in the next comment line) and the inline code of its prose, each with its strings
    made empty."""
    examples: list[str] = []
    for block in re.findall(r"^```\w*\n(.*?)^```", text, re.S | re.M):
        depth, current = 0, ""
        for line in block.splitlines():
            _, comment, after = line.partition("#")
            bare = JSON_STRING.sub('""', after) if comment else ""
            for ch in bare:
                depth += (ch in "{[") - (ch in "}]" and depth > 0)
            current += bare.lstrip() if current else bare  # a line break, not a space
            if depth == 0:
                examples.append(current)
                current = ""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    examples += [JSON_STRING.sub('""', code) for code in re.findall(r"`([^`\n]+)`", prose)
                 if '"' in code and re.search(r"[{\[]", code)]
    return examples


class ExampleTests(TestCase):
    def test_json_examples_are_compact_as_the_apis_send_them(self) -> None:
        """The APIs send compact JSON (web.replies.encode_json, as the seeds show it); the
        README showed `{"request_id": "…", "success": true, "msg": "pong"}` for the ping and
        spaced replies for the Mail API. Brackets that are not JSON (a TOML inline table,
        `[queue]`) hold no `", "` or `": "` either way."""
        spaced = [e for e in json_examples(README)
                  if re.search(r"[{\[][^{}\[\]]*?[,:] ", e) and " = " not in e]
        self.assertEqual(spaced, [])
        self.assertIn('# {"request_id":"…","success":true,"msg":"pong"}', README)

    async def test_the_ping_example_is_the_ping_reply(self) -> None:
        from tests.support.web import Web

        web = Web.build()
        user = await web.user()
        key = await web.credential(user)
        response = await web.http.request("GET", "http://127.0.0.1/api/v1/ping",
                                          headers={"Api-Key": key})
        sent = (await response.content()).decode()
        [shown] = re.findall(r"^# (.*)\n.*\bapi/v1/ping\b.*# no key", README, re.M)
        self.assertRegex(sent, "^" + re.escape(shown).replace("…", ".+") + "$")


class ArchitectureTests(TestCase):
    def test_every_package_is_named(self) -> None:
        text = section("Architecture")
        for top in ("mailcore", "web", "filters"):
            for init in sorted((ROOT / top).glob("*/__init__.py")):
                name = init.parent.name
                self.assertTrue(re.search(rf"`({top}/)?{name}/`", text), f"{top}/{name}/")

    def test_every_module_of_mailcore_is_named(self) -> None:
        text = section("Architecture")
        for path in sorted((ROOT / "mailcore").glob("*.py")):
            if path.stem != "__init__":
                self.assertTrue(re.search(rf"`{path.stem}`", text), f"mailcore/{path.name}")


    def test_imports_run_the_way_it_says(self) -> None:
        """'Imports run one way ... `smtp/` imports nothing from `queue/`' (smtp/server.py
        imported the spool's SpoolError until session 47)."""
        self.assertIn("(`smtp/` imports nothing from `queue/`)", section("Architecture"))
        for path in sorted((ROOT / "mailcore" / "smtp").glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                         else [a.name for a in node.names] if isinstance(node, ast.Import)
                         else [])
                for name in names:
                    self.assertFalse(name == "mailcore.queue"
                                     or name.startswith("mailcore.queue."),
                                     f"mailcore/smtp/{path.name} imports {name}")


class CommandTableTests(TestCase):
    def test_every_admin_command_and_action_has_its_row(self) -> None:
        rows = table_rows(README, "`mailcore ")
        for command, parser in subcommands(build_parser()).items():
            text = " ".join(r for r in rows if r.startswith(f"| `mailcore {command} ")
                            or r.startswith(f"| `mailcore {command}`"))
            self.assertTrue(text, f"mailcore {command}")
            for action, sub in subcommands(parser).items():
                self.assertTrue(re.search(rf"\b{re.escape(action)}\b", text),
                                f"mailcore {command} {action}")
                for leaf in subcommands(sub):
                    self.assertTrue(re.search(rf"\b{action} {leaf}\b", text),
                                    f"mailcore {command} {action} {leaf}")


class ConfigurationTests(TestCase):
    def test_every_table_has_its_row_and_its_module_exists(self) -> None:
        text = section("Configuration")
        rows = table_rows(text, "`[")
        for table in TABLES:
            row = [r for r in rows if re.match(rf"\| `\[{table}[\].]", r)]
            self.assertTrue(row, f"[{table}]")
            for module in re.findall(r"`((?:mailcore|web|filters)/[\w/]+\.py)`", row[-1]):
                self.assertTrue((ROOT / module).is_file(), module)

    def test_the_documented_examples_hold_the_defaults(self) -> None:
        """A `toml` example in a module the configuration table names for a table is
        accepted as it stands, and each value it writes is that key's default: an example
        that said 4 where the code has 8 would mislead every operator who read it.
        ([filters] has a test of its own, tests.test_filters_config.)"""
        rows = table_rows(section("Configuration"), "`[")
        checked = []
        for table, reader in TABLES.items():
            if table == "filters":
                continue
            row = [r for r in rows if re.match(rf"\| `\[{table}[\].]", r)][-1]
            example: dict[str, Any] = {}
            for module in re.findall(r"`((?:mailcore|web)/[\w/]+\.py)`", row):
                text = (ROOT / module).read_text(encoding="utf-8")
                for block in re.findall(r"```toml\n(.*?)```", text, re.S):
                    example.update(tomllib.loads(block).get(table, {}))
            for key in EXAMPLE_ONLY.get(table, ()):
                example.pop(key)
            if not example:
                continue
            checked.append(table)
            reactor = MemoryReactorClock()
            documented = reader(Config(sections={table: example}), reactor)
            default = reader(Config(), reactor)
            if dataclasses.is_dataclass(default):
                for key in example:
                    self.assertEqual(getattr(documented, key), getattr(default, key),
                                     f"[{table}] {key}")
            self.assertEqual(documented, default, f"[{table}]")
        self.assertGreaterEqual(len(checked), 10)

    def test_every_key_is_documented_where_the_row_says(self) -> None:
        """Each key a table takes is named in the docstrings or comments of the modules its
        row names (`[tokens] usage_retention_days` and most of `[queue]` were named
        nowhere but in the dataclass that reads them)."""
        checked = 0
        for table in TABLES:
            if table in ("filters", "plans"):  # their own readers and tests
                continue
            text = "\n".join(prose(path) for path in documented_in(table))
            for key in accepted_keys(table):
                checked += 1
                self.assertTrue(re.search(rf"\b{key}\b", text), f"[{table}] {key}")
        self.assertGreater(checked, 140)

    def test_every_daemon_option_is_in_the_reference(self) -> None:
        rows = table_rows(section("Configuration"), "`--")
        options = DaemonOptions()
        names = [p[0] for p in options.optParameters] + ["smtp", "http"]
        for name in names:
            if name == "config":
                continue
            self.assertTrue([r for r in rows if f"`--{name}`" in r], f"--{name}")
