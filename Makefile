# Carnet — every target sets up what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 5000
CHROMIUM_PATH ?= /usr/bin/chromium
export CHROMIUM_PATH

AXE := tests/browser/.node/node_modules/axe-core/axe.min.js

.PHONY: run test serve setup-run setup-test chromium translations translations-extract \
        translations-update translations-compile bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.run-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.run-installed

setup-run: $(VENV)/.run-installed translations-compile
	$(BIN)/flask --app app migrate
	$(BIN)/flask --app app catalog load
	$(BIN)/flask --app app demo
	$(BIN)/flask --app app wallet dev-credentials
	$(BIN)/flask --app app push vapid-keys --if-missing

## make run: set up, migrate the SQLite database, load catalog and demo data, then serve the
## portal with the background worker (webhooks, wallet updates, web push) beside it.
run: setup-run
	@$(BIN)/flask --app app worker & worker=$$!; \
	trap 'kill $$worker 2>/dev/null' EXIT INT TERM; \
	$(BIN)/flask --app app run --host $(HOST) --port $(PORT)

## make test: install test extras, find or install Chromium, install axe-core (the browser
## tests check every page with it), run the whole suite.
test: $(VENV)/.test-installed translations-compile chromium $(AXE)
	$(BIN)/pytest $(PYTEST_ARGS)

# axe-core from npm, into a git-ignored folder, once.
$(AXE):
	@if command -v npm >/dev/null; then :; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's npm"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm) >/dev/null; \
	else \
	  echo "npm is needed to install axe-core: install it (Debian: apt-get install npm)" >&2; exit 1; \
	fi
	npm install --prefix tests/browser/.node --no-audit --no-fund --silent axe-core@4

chromium:
	@if [ -x "$(CHROMIUM_PATH)" ]; then \
	  echo "chromium: $(CHROMIUM_PATH)"; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's chromium"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) >/dev/null; \
	else \
	  echo "Chromium not found at $(CHROMIUM_PATH): install it (Debian: apt-get install chromium) or set CHROMIUM_PATH" >&2; exit 1; \
	fi

translations: translations-extract translations-update translations-compile

translations-extract: $(VENV)/.run-installed
	$(BIN)/pybabel extract -F babel.cfg -k _l -k lazy_gettext --no-location \
	  --project Carnet -o translations/messages.pot .

translations-update: $(VENV)/.run-installed
	$(BIN)/pybabel update --no-fuzzy-matching -i translations/messages.pot -d translations

translations-compile: $(VENV)/.run-installed
	$(BIN)/pybabel compile --statistics -d translations

## make readme: refresh the README's configuration table from portal/core/config.py.
readme: $(VENV)/.run-installed
	$(BIN)/python -c 'from portal.core.config import write_readme_table; write_readme_table()'

## make bench: every benchmark at full size (PostgreSQL, npm); BENCH_ARGS=--smoke: seconds each.
bench: $(VENV)/.test-installed
	@for script in bench/bench_*.py; do echo "== $$script"; $(BIN)/python $$script $(BENCH_ARGS) || exit 1; done

lint: $(VENV)/.test-installed
	$(BIN)/ruff check portal passes tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
