# Two commands from a fresh clone:
#   make demo   generate data, run the nightly job end to end (local Ray, local disk); it prints where the table is
#   make test   the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# the CPU build first: an unpinned torch would pull several GB of CUDA packages
	$(PY) -m pip install --quiet "torch==2.13.0"
	# constraints.txt: the versions the tests pass with, the same on any day
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	@test -f demo-output/interactions/part-00000.parquet || \
		$(VENV)/bin/bert4rec generate --out demo-output/interactions --users 2000 --items 500 --mean-length 30 --seed 0 > /dev/null
	$(PY) jobs/nightly.py --config configs/nightly.yaml

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest tests/unit

clean:
	rm -rf demo-output .pytest_cache
