# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/default
CONFIG ?= configs/two_hop.py
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install run test test-slow bench bench-quick clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) -m experiments.run --config=$(CONFIG) --workdir=$(WORKDIR)

test: install
	$(PY) -m pytest -q -m "not slow" -n auto --dist loadgroup

test-slow: install
	$(PY) -m pytest -q -m slow

bench: install
	$(PY) -m bench.run

# ~1 minute; writes runs/bench-quick/ (results.json, BENCHMARKS.md, figures), not the repo's.
bench-quick: install
	$(PY) -m bench.run --mode=quick

clean:
	rm -rf $(VENV) runs
