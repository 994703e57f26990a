"""House style is checked, not hoped for: ruff over the package, the tests and the benchmarks."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys

import pytest


def test_ruff_is_clean(project_root):
    if shutil.which("ruff") is None and subprocess.run([sys.executable, "-m", "ruff", "--version"],
                                                       capture_output=True).returncode:
        pytest.skip("ruff is not installed (it is in the dev extra: make install)")
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise",
                          "tfseg", "tests", "bench"], capture_output=True, text=True, cwd=project_root,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def _forbidden_uses(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        elif isinstance(node, ast.Name) and node.id == "tf":
            found.append((node.lineno, "uses the name tf"))
            continue
        else:
            continue
        for name in names:
            if name.split(".")[0] == "tensorflow" or name.startswith(("tfseg.data", "tfseg.train")):
                found.append((node.lineno, f"imports {name}"))
    return found


def test_models_losses_metrics_use_keras_ops_only(project_root):
    """DESIGN: models, losses and metrics never touch TensorFlow (keras.ops only, so they run on any
    Keras backend) and never import the data plane or training."""
    paths = [*(project_root / "tfseg" / "models").glob("*.py"), project_root / "tfseg" / "losses.py",
             project_root / "tfseg" / "metrics.py"]
    offenders = [f"{path.relative_to(project_root)}:{line}: {what}"
                 for path in sorted(paths) for line, what in _forbidden_uses(ast.parse(path.read_text()))]
    assert not offenders, "\n".join(offenders)


def test_the_checker_catches_tensorflow():
    assert _forbidden_uses(ast.parse("import tensorflow as tf\nx = tf.zeros(1)")) == [
        (1, "imports tensorflow"), (2, "uses the name tf")]
    assert _forbidden_uses(ast.parse("from tfseg.data import pipeline")) == [(1, "imports tfseg.data")]


def test_data_plane_never_imports_models_train_or_cli(project_root):
    """DESIGN: data flows one way; tfseg.data knows nothing of models, training or the CLI."""
    offenders = []
    for path in sorted((project_root / "tfseg" / "data").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}:{node.lineno}: imports {n}" for n in names
                          if n.startswith(("tfseg.models", "tfseg.train", "tfseg.cli", "tfseg.inference"))]
    assert not offenders, "\n".join(offenders)
