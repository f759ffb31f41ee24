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

# Retrains the built-in model with train/flickr8k_coco.toml (needs ../shared's Flickr8k and
# coco_extra; under an hour on 2 cores) and packs its best checkpoint into the package in fp16
# (23 MiB) with the decode-time grounding settings chosen on the dev splits and the classifier's
# evidence calibrated on them, scored again on both test splits.
builtin-model: $(VENV)/.installed
	$(PY) -m captioner train train/flickr8k_coco.toml
	$(PY) -m captioner export runs/flickr8k_coco/best captioner/pretrained/flickr8k_coco --fp16 \
		--evidence-weight 0.5 --evidence-threshold 0.5 --person-weight 8 --person-threshold 0.5 \
		--object-weight 3 --object-threshold 0.3 --include-threshold 0.5 --include-cost 6 --consensus-samples 20 \
		--calibrate ../shared/data/coco_extra --calibrate ../shared/data/flickr8k \
		--objects ../shared/data/coco_objects/synonyms.txt --score runs/flickr8k_coco/builtin-test
