# Two entry points from a fresh clone: `make demo` and `make test`.
# Both create/refresh the virtualenv and install everything they need.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint tables bench clean venv crds chart-files image native

$(STAMP): pyproject.toml
	# iproute2 (tc shaping backend) and prometheus (promtool, `infemu run --prometheus`):
	# Debian packages, installed when missing and we are root
	(command -v tc && command -v promtool) >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	   iproute2 prometheus) || true
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || \
	  (apt-get update -q && apt-get install -y -q python3-venv && $(PYTHON) -m venv $(VENV))
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/infemu run examples/quickstart.yaml --out runs/demo

# The engine core compiled with mypyc (emulator/native.py: simulations up to ~1.5x faster): gcc and
# Python's headers are Debian packages, installed when missing and we are root. Without them, or
# when the build fails, the engine runs as pure Python (the same results; the tests compare both).
NATIVE  := emulator/_native/manifest.json
NATIVE_SOURCES := emulator/native.py tools/build_native.py \
  $(addprefix emulator/engine/,request.py block_pool.py kv_cache.py scheduler.py)

$(NATIVE): $(STAMP) $(NATIVE_SOURCES)
	(command -v gcc && $(BIN)/python -c "import os, sys, sysconfig; \
	  sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))") >/dev/null 2>&1 || \
	  [ "$$(id -u)" != 0 ] || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	  --no-install-recommends gcc python3-dev) || true
	$(BIN)/python tools/build_native.py || echo "make: the engine core stays pure Python (the line above says why)"

native: $(NATIVE)

test: $(STAMP) $(NATIVE)
	# Debian's chromium for the report screenshot test (skipped with the reason where it is missing)
	command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	   chromium) || true
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=20

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Regenerate the compact cost tables from ../shared/data (maintainers only).
tables: $(STAMP)
	$(BIN)/python tools/derive_tables.py --shared ../shared/data --out emulator/costmodel/data

bench: $(STAMP)
	$(BIN)/python benchmarks/sim_speed.py
	$(BIN)/python benchmarks/costmodel_accuracy.py

# Regenerate the chart's CRDs from the pydantic models and copy the dashboards into the chart
# (tests fail when either drifts).
crds: $(STAMP)
	$(BIN)/infemu crds --out charts/infemu/crds

chart-files:
	cp dashboards/prometheus/infemu-rules.yaml dashboards/grafana/infemu-fleet.json charts/infemu/files/

# The one image, from the Containerfile: with docker or podman (CONTAINER=podman make image) when
# one is installed; otherwise, with no container engine, by ../shared/k8s/make-image.sh (this
# project's machines and CI), which follows the same Containerfile and loads the image into the
# local Kubernetes node (docs/kubernetes.md, "Building the image").
CONTAINER ?= docker
IMAGE     ?= infemu:dev
K8S_DIR   ?= ../shared/k8s
image:
	@if command -v $(CONTAINER) >/dev/null 2>&1; then \
	  $(CONTAINER) build -f Containerfile -t $(IMAGE) . ; \
	elif [ -x $(K8S_DIR)/make-image.sh ]; then \
	  $(K8S_DIR)/make-image.sh . $(IMAGE) ; \
	else \
	  echo "make image: no '$(CONTAINER)' and no $(K8S_DIR)/make-image.sh; install docker or podman" \
	       "(CONTAINER=podman make image) or use the engine-free builder (docs/kubernetes.md)" >&2 ; exit 1 ; \
	fi

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache emulator/_native
