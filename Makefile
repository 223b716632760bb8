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
	@echo "              bench/models.py (every model variant against its fp32 ONNX)"
	@echo "              bench/overload.py (capacity, hand-off to the cloud endpoint, cloud killed)"
	@echo "make models - rebuild models/digits from scikit-learn's digits data, and its int8/pruned variants"

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
	$(BIN)/python bench/models.py
	$(BIN)/python bench/overload.py

lint: setup
	$(BIN)/ruff check edgefn tests bench models examples

# The TFLite files and digits-cnn are built with TensorFlow, which is no dependency of edgefn: they are
# rebuilt only where it is installed (in the venv), else the shipped ones are kept. The ONNX variants
# (int8, pruned50, pruned50-int8) are always made again from the float models.
OPTIMIZE = $(BIN)/edgefn model optimize --quantize int8 --prune 0.5 --max-drop 0.02

models: setup
	$(BIN)/python models/digits/build.py
	@if $(BIN)/python -c "import tensorflow" 2>/dev/null; then \
	  $(BIN)/python models/digits/build_tflite.py && $(BIN)/python models/digits-cnn/build.py; \
	else echo "TensorFlow is not installed: keeping the shipped TFLite files and digits-cnn"; fi
	for m in digits digits-cnn; do \
	  $(OPTIMIZE) models/$$m/model.onnx --calibration models/$$m/calibration.npz --validation models/$$m/validation.npz \
	  || exit 1; done

clean:
	rm -rf $(VENV) examples/functions/*/build .pytest_cache
