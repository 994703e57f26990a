"""Shared fixtures: the real data sets in ../shared/data (skipped with a reason when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TFSEG_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared_path(*parts: str) -> Path:
    """Path inside ../shared/data, or skip the test with the reason when it is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found at {path} (expected ../shared/data beside the project)")
    return path


def require_sm() -> None:
    """Skip the test, with the reason, where segmentation_models (the dev extra) is not installed."""
    import importlib.util

    if importlib.util.find_spec("segmentation_models") is None:
        pytest.skip("segmentation_models is not installed (it is in the dev extra)")


def sm_env(legacy_keras: bool = False) -> dict:
    """Environment for a segmentation_models subprocess (``SM_FRAMEWORK=tf.keras``, CPU only): on
    Keras 3, or on tf_keras (Keras 2) with ``legacy_keras``, whose ``save_weights`` writes the HDF5
    format of sm's published weight files."""
    env = {**os.environ, "SM_FRAMEWORK": "tf.keras", "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TF_USE_LEGACY_KERAS", None)
    if legacy_keras:
        env["TF_USE_LEGACY_KERAS"] = "1"
    return env


@pytest.fixture
def shared_data() -> Path:
    """The ../shared/data folder (ISBI 2012, Kvasir-SEG, Carvana, CamVid, DSB2018)."""
    return shared_path()


@pytest.fixture
def project_root() -> Path:
    return ROOT


@pytest.fixture
def count_traces():
    """``count_traces(model)`` wraps ``model.train_step`` so that each trace of it (each Python call
    of the step, which ``tf.function`` makes only when it traces) is counted; returns ``[count]``."""

    def wrap(model) -> list[int]:
        traces = [0]
        step = model.train_step

        def counted(data):
            traces[0] += 1
            return step(data)

        model.train_step = counted
        return traces

    return wrap
