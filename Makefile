# Quick start on a fresh machine: `make run` (web UI) and `make test` (the whole suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test builtin-model

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --disable-pip-version-check -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install --disable-pip-version-check -q -e ".[test,lite]"
	touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) app.py

test: $(VENV)/.installed-test
	$(PY) -m pytest $(PYTEST_ARGS)

# Retrains the built-in model with train/flickr8k.toml (needs the Flickr8k data, under 30 min on
# 2 cores) and packs its best checkpoint into the package in fp16 (under 25 MB), scored again on the
# test split.
DATASET ?= ../shared/data/flickr8k
builtin-model: $(VENV)/.installed
	$(PY) -m captioner train train/flickr8k.toml --dataset $(DATASET)
	$(PY) -m captioner export runs/flickr8k/best captioner/pretrained/flickr8k --fp16 --score runs/flickr8k/builtin-test --dataset $(DATASET)
