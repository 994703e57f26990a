"""Every ``--set`` in the shell examples of the docs reaches the config as the docs mean it.

The shell removes one level of quotes before tfseg parses the value as YAML, so
``--set submit.id_format="{stem}"`` arrives as ``{stem}``, a YAML mapping, and fails; the example
must quote twice: ``--set 'submit.id_format="{stem}"'``. Here each example command is split as a
POSIX shell splits it (``shlex``) and its overrides are loaded the way ``tfseg`` loads them.
"""

from __future__ import annotations

import re
import shlex

import pytest

from tfseg.config import load_config

FENCE = re.compile(r"^```.*?\n(.*?)^```", re.S | re.M)
# a command line, not the output lines that start with the command's name (``tfseg models: error: ...``)
COMMAND = re.compile(r"^(?:\$ )?(?:tfseg|python3? -m tfseg\S*) (?![\w-]+: )")


def doc_commands(root):
    """(file, command) of every tfseg command in a fenced block of README.md and docs/*.md."""
    for path in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for block in FENCE.findall(path.read_text(encoding="utf-8")):
            for line in block.replace("\\\n", " ").splitlines():
                if COMMAND.match(line.strip()):
                    yield path.name, line.strip()


def overrides(command: str) -> list[str]:
    """The values of the command's --set options, after the shell's quote removal; the brackets that
    mark an optional part of a usage line (``[--set a=1 --set b=2]``) are dropped."""
    words = [w.removeprefix("[") if w.startswith("[--") else w for w in shlex.split(command)]
    words = [w[:-1] if w.endswith("]") and w.count("]") > w.count("[") else w for w in words]
    return [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--set"]


def test_the_docs_have_shell_examples_with_overrides(project_root):
    commands = list(doc_commands(project_root))
    assert sum(bool(overrides(c)) for _, c in commands) >= 5
    hubmap = [c for name, c in commands if name == "inference.md" and "submit.id_format" in c]
    assert hubmap and "submit.id_format={stem}" in overrides(hubmap[0])[-1].replace('"', "")


def test_every_override_in_the_docs_loads(project_root):
    bad = []
    for name, command in doc_commands(project_root):
        try:
            load_config(None, overrides(command))
        except Exception as err:  # noqa: BLE001 - collected, reported together
            bad.append(f"{name}: {command[:80]}...: {err}")
    if bad:
        pytest.fail("\n".join(bad))
