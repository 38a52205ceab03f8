# PCE: `make demo` and `make test` work from a fresh clone: they create .venv, install, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pce-installed
# The PyTorch build to install first. These pins are the ones served on the project's CI machines;
# elsewhere `make test TORCH_PACKAGES="torch torchvision"` lets pip resolve a matching pair.
TORCH_PACKAGES ?= torch==2.14.1 torchvision==0.29.1

export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_OFFLINE := 1
export PYTHONWARNINGS := ignore::FutureWarning
# OpenMP threads sleep instead of spinning while they wait: on a busy machine spinning cost 4x the wall time
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install demo test lint benchmark clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PACKAGES)
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

# the quick demo (about 2 CPU-minutes of training, one screen naming its outputs); FULL=1: the longer recipe
demo: install
	$(PY) tools/demo.py $(if $(FULL),--full)

test: install
	$(PY) -m pytest -q

# import-linter's layer contracts (pyproject.toml [tool.importlinter]) on a view that maps tasks/ and datasets/
# to pce.tasks / pce.datasets as the editable install does; the test suite runs the same check
lint: install
	$(PY) tests/test_import_contracts.py

benchmark: install
	$(PY) tools/benchmark.py --quick

clean:
	rm -rf $(VENV) work_dirs .pytest_cache
