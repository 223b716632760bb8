# edgefn: `make demo` runs the main job on embedded defaults; `make test` runs the test suite.
# Both set everything up first: a .venv with the package, and the system packages the tests run for real
# (mosquitto, PostgreSQL, chromium; Debian packages) where missing.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_ARGS ?=
PYTEST_ARGS ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help setup system-deps peers demo test bench lint models clean

help:
	@echo "make demo   - local broker + daemon + digits function + simulated sensors, live table"
	@echo "              (make demo DEMO_ARGS=\"--duration 30\" stops by itself)"
	@echo "make test   - the whole test suite (real mosquitto, real models, real components)"
	@echo "make bench  - bench/e2e.py (edgefn against a plain paho + onnxruntime script)"
	@echo "              bench/reliability.py (journal cost, SIGKILL loop), bench/containment.py"
	@echo "              bench/models.py (every model variant against its fp32 ONNX)"
	@echo "              bench/overload.py (capacity, hand-off to the cloud endpoint, cloud killed)"
	@echo "              bench/fleet.py (rollout of a good and a bad bundle to 500 simulated devices)"
	@echo "              bench/elastic.py (cold start after scale to zero, memory freed, elastic vs fixed pool)"
	@echo "make lint   - ruff over the package, the cloud service, tests, benches, models and examples"
	@echo "make setup  - .venv with every extra, then system-deps"
	@echo "make peers  - .venv-peers: Seldon MLServer and KServe, each in its own venv (the tests hand off to them)"
	@echo "make system-deps - mosquitto, postgresql, chromium and faketime (apt), each only when missing"
	@echo "make models - rebuild models/digits from scikit-learn's digits data, and its int8/pruned variants"

setup: $(BIN)/.installed system-deps

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[build,demo,models,dev]'
	touch $@

# What the tests run for real: mosquitto (the broker), PostgreSQL (the fleet server's database; the
# tests start their own cluster with initdb), chromium (the fleet page, rendered headless) and faketime
# (a device whose clock is off). The demo needs only mosquitto. Each is looked for first; apt runs once,
# for the missing ones only.
SYSTEM_DEPS ?= mosquitto postgresql chromium faketime

system-deps:
	@missing=""; \
	  for dep in $(SYSTEM_DEPS); do case $$dep in \
	    mosquitto) { command -v mosquitto || [ -x /usr/sbin/mosquitto ]; } >/dev/null 2>&1 || missing="$$missing $$dep";; \
	    postgresql) { ls /usr/lib/postgresql/*/bin/initdb || command -v initdb; } >/dev/null 2>&1 || missing="$$missing $$dep";; \
	    chromium) { command -v chromium || command -v chromium-browser; } >/dev/null 2>&1 || missing="$$missing $$dep";; \
	    faketime) ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || missing="$$missing $$dep";; \
	  esac; done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing$$missing (Debian packages)"; \
	    $(SUDO) apt-get update -qq && \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  fi

# Third-party inference servers the tests hand work off to (tests/test_peers.py), each in a venv of its own:
# their pins clash with edgefn's and with each other's (MLServer's FastAPI wants an older Starlette than
# KServe's). Rebuilt when their requirements change.
PEERS ?= .venv-peers
PEER_KINDS := mlserver kserve

peers: $(foreach k,$(PEER_KINDS),$(PEERS)/$(k)/.installed)

$(PEERS)/%/.installed: tests/peers/%.txt
	rm -rf $(PEERS)/$*
	$(PYTHON) -m venv $(PEERS)/$*
	$(PEERS)/$*/bin/python -m pip install --quiet -r $<
	touch $@

demo: $(BIN)/.installed
	@$(MAKE) --no-print-directory system-deps SYSTEM_DEPS=mosquitto
	$(BIN)/edgefn demo $(DEMO_ARGS)

test: setup peers
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/python bench/e2e.py
	$(BIN)/python bench/reliability.py
	$(BIN)/python bench/containment.py
	$(BIN)/python bench/models.py
	$(BIN)/python bench/overload.py
	$(BIN)/python bench/fleet.py
	$(BIN)/python bench/elastic.py

lint: setup
	$(BIN)/ruff check edgefn cloud_sync tests bench models examples

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
	rm -rf $(VENV) $(PEERS) examples/functions/*/build .pytest_cache
