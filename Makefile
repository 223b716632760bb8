# edgefn: `make demo` runs the main job on embedded defaults; `make test` runs the test suite.
# Both set everything up first: a .venv with the package, mosquitto (Debian package) if missing.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_ARGS ?=
PYTEST_ARGS ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help setup demo test bench lint mosquitto models clean

help:
	@echo "make demo   - local broker + daemon + digits function + simulated sensors, live table"
	@echo "              (make demo DEMO_ARGS=\"--duration 30\" stops by itself)"
	@echo "make test   - the whole test suite (real mosquitto, real models, real components)"
	@echo "make bench  - bench/e2e.py (edgefn against a plain paho + onnxruntime script)"
	@echo "              bench/reliability.py (journal cost, SIGKILL loop), bench/containment.py"
	@echo "make models - rebuild models/digits from scikit-learn's digits data"

setup: $(BIN)/.installed mosquitto

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[build,demo,models,dev]'
	touch $@

mosquitto:
	@command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || \
	  { echo "installing mosquitto (Debian package)"; \
	    $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null; }

demo: setup
	$(BIN)/edgefn demo $(DEMO_ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/python bench/e2e.py
	$(BIN)/python bench/reliability.py
	$(BIN)/python bench/containment.py

lint: setup
	$(BIN)/ruff check edgefn tests bench models examples

models: setup
	$(BIN)/python models/digits/build.py

clean:
	rm -rf $(VENV) examples/functions/*/build .pytest_cache
