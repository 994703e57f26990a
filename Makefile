# tfseg: the verbs. `make install` then `make test` on a fresh machine.
PYTHON ?= python3
CONFIG ?= params.yaml
FOLD ?= 0
SET ?=
PYTEST_WORKERS ?= 2

.PHONY: install test test-all lint tfrecords verify train predict bench docs gpu-wheels

install:  ## install tfseg and its development tools (editable)
	$(PYTHON) -m pip install --upgrade pip
	$(PYTHON) -m pip install -e ".[dev]"

test:  ## the fast test suite (what CI runs); slow tests are skipped
	$(PYTHON) -m pytest -n $(PYTEST_WORKERS) --dist worksteal -q

test-all:  ## every test, slow ones included
	$(PYTHON) -m pytest -n $(PYTEST_WORKERS) --dist worksteal -q -m "slow or not slow"

lint:
	$(PYTHON) -m ruff check tfseg tests bench

tfrecords:  ## write the sharded TFRecords of CONFIG
	$(PYTHON) -m tfseg tfrecords --config $(CONFIG) $(SET)

verify:
	$(PYTHON) -m tfseg verify $$($(PYTHON) -c "from tfseg.config import load_config; print(load_config('$(CONFIG)').data.tfrecord_dir)")

train:  ## train fold FOLD of CONFIG (FOLD=all for every fold; SET=--overwrite trains finished folds again)
	$(PYTHON) -m tfseg train --config $(CONFIG) --fold $(FOLD) $(SET)

docs:  ## regenerate docs/config.md (tfseg/config.py) and docs/cli.md (tfseg/cli.py's parsers)
	$(PYTHON) -m tfseg.config > docs/config.md
	$(PYTHON) -m tests.test_docs > docs/cli.md

bench:
	$(PYTHON) bench/input_pipeline.py

# The lent GPU machines have JAX and PyTorch (Python 3.12) but neither TensorFlow nor these; the run
# there installs them with `pip install --no-index --no-deps --target /tmp/site .whl/*.whl`
# (docs/BENCHMARKS.md, "GPU training").
GPU_PYTHON ?= 3.12
gpu-wheels:  ## download into .whl/ the wheels bench/gpu_train.py needs on a GPU machine without TensorFlow
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
		keras==$$($(PYTHON) -c "import keras; print(keras.__version__)") namex optree segmentation-models-pytorch
