# Two commands for a fresh machine with Python 3.11:
#   make quickstart   set everything up, then run r1lab's main job on the built-in tiny model
#   make test         set everything up, then lint and run the tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup quickstart test lint browser clean

$(BIN)/r1lab: pyproject.toml requirements/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements/cpu.txt -e '.[dev]'
	@touch $@

setup: $(BIN)/r1lab

# Headless Chromium for the browser tests (report page, chat page): Debian's package, no download
# of a browser by a test tool.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not found; browser tests will be skipped"; fi; }

quickstart: setup
	$(BIN)/r1lab quickstart recipes/quickstart.yaml

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: setup browser lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
