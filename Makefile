# edgefn: `make demo` runs the main job on embedded defaults; `make test` runs the test suite.
# Both set everything up first: a .venv with the package, and the system packages the tests run for real
# (mosquitto, PostgreSQL, chromium; Debian packages) where missing.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_ARGS ?=
PYTEST_ARGS ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help setup system-deps peers demo test test-core py310 arm64-deps arm64-smoke arm64-install bench lint models clean

help:
	@echo "make demo   - local broker + daemon + digits function + simulated sensors, live table"
	@echo "              (make demo DEMO_ARGS=\"--duration 30\" stops by itself)"
	@echo "make test   - the whole test suite (real mosquitto, real models, real components), then py310, arm64-smoke, arm64-install"
	@echo "make py310  - the core tests again on Python 3.10 (JetPack 6's), in .venv-py310"
	@echo "make arm64-smoke - edgefn in a Debian arm64 root under qemu, as a Pi 4 (Cortex-A72) and a Pi 5 (Cortex-A76)"
	@echo "make arm64-install - the README's device steps as written (venv, pip install .) in an arm64 root under qemu"
	@echo "make bench  - bench/e2e.py (edgefn against a plain paho + onnxruntime script); bench/stages.py (where its time goes)"
	@echo "              bench/reliability.py (journal cost, SIGKILL loop), bench/containment.py"
	@echo "              bench/models.py (every model variant against its fp32 ONNX)"
	@echo "              bench/overload.py (capacity, hand-off to the cloud endpoint, cloud killed)"
	@echo "              bench/fleet.py (rollout of a good and a bad bundle to 500 simulated devices)"
	@echo "              bench/elastic.py (cold start after scale to zero, memory freed, elastic vs fixed pool)"
	@echo "              bench/share.py (two daemons on one \$$share stream, one SIGKILLed: who answers what)"
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
	@$(MAKE) --no-print-directory py310
	@$(MAKE) --no-print-directory arm64-smoke
	@$(MAKE) --no-print-directory arm64-install

# JetPack 6 ships Python 3.10 (Ubuntu 22.04); there onnxruntime stops at 1.23 and numpy at 2.2. The core
# tests (configuration, journal, sandbox and boundary, models, profiles, daemon) run again on it, in a venv
# of its own. Python 3.10 is taken from PATH, else from pyenv's versions; PYTHON310=... names another.
PYTHON310 ?= $(shell for p in $$(command -v python3.10) $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.10*/bin/python3.10; do \
  "$$p" -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null && { echo "$$p"; break; }; done)
VENV310 ?= .venv-py310
CORE_TESTS ?= tests/test_imports.py tests/test_config.py tests/test_topics.py tests/test_errors.py \
  tests/test_manifest.py tests/test_inbox.py tests/test_state.py tests/test_profiles.py tests/test_models.py \
  tests/test_litert.py tests/test_boundary.py tests/test_guest_tensors.py tests/test_sandbox.py tests/test_daemon.py \
  tests/test_preflight.py tests/test_workers.py

py310: $(VENV310)/.installed
	@$(MAKE) --no-print-directory system-deps SYSTEM_DEPS=mosquitto
	$(VENV310)/bin/python -m pytest $(PYTEST_ARGS) $(CORE_TESTS)

$(VENV310)/.installed: pyproject.toml
	@[ -n "$(PYTHON310)" ] || { echo "no Python 3.10 found (PATH, pyenv): install one (pyenv install 3.10) or set PYTHON310=" >&2; exit 1; }
	rm -rf $(VENV310)
	$(PYTHON310) -m venv $(VENV310)
	$(VENV310)/bin/python -m pip install --quiet --upgrade pip
	$(VENV310)/bin/python -m pip install --quiet -e '.[build,demo,models,dev]'
	touch $@

# The arm64 proof (tests/arm64/smoke.py): a Debian bookworm arm64 root unpacked from Debian's packages,
# the aarch64 wheels from the package index, run under qemu-user pinned to a Pi 4's and a Pi 5's CPU.
# Needs root (chroot, mounts, binfmt_misc). The root and the compiled component are kept in .cache/arm64
# and made again only when what goes into them changes.
ARM64_DEPS := qemu-user-static mmdebstrap

arm64-deps:
	@command -v mmdebstrap >/dev/null && [ -x /usr/bin/qemu-aarch64-static ] || { \
	  echo "installing $(ARM64_DEPS) (Debian packages)"; $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(ARM64_DEPS) >/dev/null; }

arm64-smoke: $(BIN)/.installed arm64-deps
	$(SUDO) $(BIN)/python tests/arm64/smoke.py

# The README's device steps as written (tests/arm64/install.py): in a clean clone copied into an arm64 root
# with Debian's venv module, the preflight check, `python3 -m venv`, pip (emulated, from the package index)
# and the venv's `edgefn profile detect` and `fn invoke`, on a Pi 4's CPU. It maps the component the smoke
# compiled (made when missing); `make test` runs it after the smoke.
arm64-install: $(BIN)/.installed arm64-deps
	$(SUDO) $(BIN)/python tests/arm64/install.py

bench: setup
	$(BIN)/python bench/e2e.py
	$(BIN)/python bench/stages.py
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
	rm -rf $(VENV) $(VENV310) $(PEERS) examples/functions/*/build .pytest_cache .cache/arm64
