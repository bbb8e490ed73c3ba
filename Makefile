# Two commands for a fresh machine: `make run` and `make test`. Both set up .venv when it is missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test setup clean

setup: $(STAMP)

# torch first, alone: `torch==2.13.0` resolves to the CPU wheel on these machines; anything that pulled
# torch in as a dependency first could fetch a CUDA build (gigabytes).
$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/rlfleet quickstart

test: $(STAMP)
	$(VENV)/bin/pytest

clean:
	rm -rf $(VENV) runs *.egg-info
