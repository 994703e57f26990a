"""The generated CLI reference is current, and the documentation's links point at files that exist.

docs/cli.md is generated from the argparse parsers of ``tfseg.cli`` (the text of
``tfseg <command> --help`` for every command) by::

    python3 -m tests.test_docs > docs/cli.md        # or: make docs
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from unittest import mock

from tfseg import cli

ROOT = Path(__file__).resolve().parents[1]
HELP_COLUMNS = "100"  # argparse wraps help text at $COLUMNS: fixed so the file does not depend on a terminal


def _help(parser) -> str:
    with mock.patch.dict(os.environ, {"COLUMNS": HELP_COLUMNS}):
        return parser.format_help().rstrip()


def cli_reference() -> str:
    """Markdown of ``tfseg --help`` and ``tfseg <command> --help`` for every command in ``cli.COMMANDS``."""
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    lines = ["# Command-line reference", "",
             "Generated from the parsers in `tfseg/cli.py` by `python3 -m tests.test_docs > docs/cli.md`; "
             "`tests/test_docs.py` fails when this file is stale.", "",
             "Every command that takes `--config` also takes any number of `--set section.key=value` "
             "(the value parsed as YAML; keys in [config.md](config.md)). A user error (bad key, missing "
             "file, bad data) exits with status 2 and one line on stderr.", "",
             "| command | what it does |", "|---|---|"]
    for name, (_, help_text) in cli.COMMANDS.items():
        lines.append(f"| [`tfseg {name}`](#tfseg-{name}) | {help_text} |")
    lines += ["", "## tfseg", "", "```text", _help(parser), "```", ""]
    for name in cli.COMMANDS:
        lines += [f"## tfseg {name}", "", "```text", _help(subparsers.choices[name]), "```", ""]
    return "\n".join(lines)


def test_cli_reference_is_current():
    current = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    stale = "docs/cli.md is stale: run `python3 -m tests.test_docs > docs/cli.md`"
    assert current == cli_reference() + "\n", stale


def test_cli_reference_covers_every_command_and_option():
    text = cli_reference()
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sub in subparsers.choices.items():
        assert f"## tfseg {name}" in text
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in text, f"tfseg {name} {flag}"


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
DOCS = ["README.md", "configs/README.md", "docs/index.md", "docs/migrating_from_sm.md", "docs/cli.md"]


def test_relative_links_resolve():
    broken = []
    for doc in DOCS:
        path = ROOT / doc
        for target in LINK.findall(path.read_text(encoding="utf-8")):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (path.parent / target).exists():
                broken.append(f"{doc} -> {target}")
    assert not broken, broken


if __name__ == "__main__":
    print(cli_reference())
