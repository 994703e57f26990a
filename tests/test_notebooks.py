"""The notebooks in notebooks/ run headless on tiny data and draw their figures; they are committed clean.

Each notebook has a code cell tagged ``parameters`` (papermill's convention). The test inserts a
cell after it that points the notebook at tiny generated data in tmp_path and shrinks the recipe
(the same shrinking as tests/test_recipes.py), executes the notebook with nbclient in a fresh
kernel (working directory notebooks/, as a user opening it), and checks that every cell ran, that
the figures were displayed (``image/png`` outputs) and written, and the outputs the notebook
promises (submission file, run directory). Each execution starts a kernel, imports TensorFlow and
trains a tiny model: the executions are in the slow suite (``make test-all``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest

from tests.test_recipes import make_carvana, make_hubmap

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
COMMON_TINY = ["data.workers=1", "data.shards=2", "data.shuffle_buffer=8", "data.cache=false",
               "model.encoder_weights=null", "train.batch_size=2", "train.steps_per_epoch=1",
               "train.validation_steps=1", "train.tensorboard=false", "train.steps_per_execution=1",
               "infer.batch_size=4"]


def _parameters_index(book) -> int:
    tagged = [i for i, c in enumerate(book.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "expected exactly one cell tagged 'parameters'"
    return tagged[0]


def execute(name: str, params: dict, setup: str = "", timeout: int = 900):
    """Run notebooks/<name> with ``params`` injected after its parameters cell; return the run notebook."""
    from nbclient import NotebookClient

    book = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    index = _parameters_index(book)
    lines = [f"{key} = {value!r}" for key, value in params.items()]
    injected = nbformat.v4.new_code_cell("\n".join(["# injected by tests/test_notebooks.py", setup, *lines]))
    injected.metadata["tags"] = ["injected-parameters"]
    book.cells.insert(index + 1, injected)
    client = NotebookClient(book, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}})
    client.execute()
    return book


def _images(book) -> int:
    kinds = ("display_data", "execute_result")
    return sum("image/png" in out.get("data", {}) for c in book.cells if c.cell_type == "code"
               for out in c.get("outputs", []) if out.get("output_type") in kinds)


def _errors(book) -> list[str]:
    return [f"{out.get('ename')}: {out.get('evalue')}" for c in book.cells if c.cell_type == "code"
            for out in c.get("outputs", []) if out.get("output_type") == "error"]


# ------------------------------------------------------------------------------------------------
# fast: the committed notebooks are clean and parameterised
# ------------------------------------------------------------------------------------------------


def test_the_three_notebooks_exist():
    assert {p.name for p in NOTEBOOKS} >= {"hubmap_tpu_train.ipynb", "oxford_pet_tutorial.ipynb",
                                           "carvana_quickstart.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    book = nbformat.read(path, as_version=4)
    nbformat.validate(book)
    dirty = [i for i, c in enumerate(book.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; strip them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_one_parameters_cell_that_compiles(path):
    book = nbformat.read(path, as_version=4)
    cell = book.cells[_parameters_index(book)]
    assert cell.cell_type == "code"
    names: dict = {}
    exec(compile(cell.source, f"{path.name}:parameters", "exec"), names)  # plain assignments only
    assert "WORK_DIR" in names and "SET" in names and isinstance(names["SET"], list)
    for c in book.cells:  # every code cell is valid Python
        if c.cell_type == "code":
            compile(c.source, path.name, "exec")


# ------------------------------------------------------------------------------------------------
# slow: each notebook executes on tiny data
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_carvana_quickstart_runs_to_a_submission(tmp_path):
    from tfseg.submission import read_submission

    data = make_carvana(tmp_path / "carvana", cars=6)
    test_dir = tmp_path / "test"
    test_dir.mkdir()
    for path in sorted((data / "train").glob("*.jpg"))[:2]:
        shutil.copy(path, test_dir / path.name)
    work = tmp_path / "work"
    book = execute("carvana_quickstart.ipynb", {
        "DATA_ROOT": str(data), "TEST_IMAGES": str(test_dir), "WORK_DIR": str(work), "EPOCHS": 1,
        "SET": [*COMMON_TINY, "data.image_size=[32,32]", "model.options={filters: [4, 4, 8, 8], center: 16}",
                "train.strategy=default", "infer.tile_size=32"]})
    assert not _errors(book)
    assert _images(book) >= 4  # samples, curves, one overlay per test image
    assert (work / "figures" / "samples.png").is_file()
    assert (work / "runs" / "carvana_unet1024" / "fold0" / "curves.png").is_file()
    header, rows = read_submission(work / "submission.csv.gz")
    assert header == ("img", "rle_mask")
    assert sorted(r[0] for r in rows) == sorted(p.name for p in test_dir.iterdir())


@pytest.mark.slow
def test_oxford_pet_tutorial_runs_on_tfds_mock_data(tmp_path):
    tfds_dir = tmp_path / "tfds"
    setup = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
             "from tests.test_recipes import mock_pets\n"
             f"_mock = mock_pets(__import__('pathlib').Path({str(tfds_dir)!r}), n=12); _mock.__enter__()")
    work = tmp_path / "work"
    book = execute("oxford_pet_tutorial.ipynb", {
        "TFDS_DATA_DIR": str(tfds_dir), "WORK_DIR": str(work), "EPOCHS": 2, "SHOW": 2,
        "SET": [*COMMON_TINY, "data.image_size=[32,32]", "train.strategy=default",
                "model.options={freeze: true, filters: [16, 16, 16, 16]}"]}, setup=setup)
    assert not _errors(book)
    figures = {p.stem for p in (work / "figures").glob("*.png")}
    assert {"samples", "predictions_epoch0", "predictions_epoch1", "predictions_epoch2", "loss_curves",
            "predictions_weighted"} <= figures
    assert _images(book) >= 7
    for run in ("oxford_pet", "oxford_pet_weighted"):  # both trained through tfseg.train.run
        assert (work / "runs" / run / "fold0" / "best.keras").is_file()


@pytest.mark.slow
def test_hubmap_notebook_runs_kfold_and_submits(tmp_path):
    from tfseg.submission import read_submission

    data = make_hubmap(tmp_path / "hubmap", images=5)
    test_dir = tmp_path / "test"
    test_dir.mkdir()
    shutil.copy(sorted((data / "train").glob("*.tiff"))[0], test_dir / "test_kidney.tiff")
    work = tmp_path / "work"
    book = execute("hubmap_tpu_train.ipynb", {
        "DATA_ROOT": str(data), "TEST_IMAGES": str(test_dir), "WORK_DIR": str(work), "EPOCHS": 1,
        "FOLDS": "0",
        "SET": [*COMMON_TINY, "data.tile_size=64", "data.tile_reduce=2", "data.tile_min_tissue=0",
                "data.image_size=[32,32]", "model.backbone=efficientnetb0", "infer.tile_size=32",
                "infer.tta=2"]})  # train.strategy stays auto: the notebook's claim on a CPU machine
    assert not _errors(book)
    assert (work / "figures" / "tiles.png").is_file()
    assert (work / "runs" / "hubmap_effb5" / "fold0" / "curves.png").is_file()
    assert _images(book) >= 3  # tiles, curves, overlay
    header, rows = read_submission(work / "submission.csv")
    assert header == ("id", "predicted") and [r[0] for r in rows] == ["test_kidney"]
