# One-command install, build, test and run. Every target installs what it needs first, so any of
# them is a valid first command on a fresh clone.

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROTOS := $(wildcard protos/cbir/v1/*.proto)
GEN    := $(patsubst protos/%.proto,%_pb2.py,$(PROTOS))
# TF Serving's config-file formats that tensorflow-serving-api does not ship (read by embedder/).
TFS_PROTOS := $(wildcard protos/cbir/tfserving/*.proto)
PYTEST_ARGS ?=

.PHONY: install protos test browser test-fast test-stateful check lint format clean demo up down status bench bench-quick images help
.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (Python 3.11 is required; set PYTHON=...)" >&2; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# Generated stubs (+ .pyi) depend on the .proto files; generated code is never committed.
cbir/v1/__init__.py: $(PROTOS) $(STAMP)
	mkdir -p cbir/v1
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	echo '"""Generated from protos/cbir/v1 by make protos; do not edit."""' > $@

# The same protos with their comments, for the gateway's OpenAPI document (gateway/openapi.py).
cbir/v1/descriptors.binpb: $(PROTOS) $(STAMP)
	mkdir -p cbir/v1
	$(PY) -m grpc_tools.protoc -Iprotos --include_source_info --descriptor_set_out=$@ $(PROTOS)

cbir/tfserving/__init__.py: $(TFS_PROTOS) $(STAMP)
	mkdir -p cbir/tfserving
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. $(TFS_PROTOS)
	echo '"""Generated from protos/cbir/tfserving by make protos; do not edit."""' > $@

install: $(STAMP) cbir/v1/__init__.py cbir/v1/descriptors.binpb cbir/tfserving/__init__.py ## create .venv with the pinned packages and generate the gRPC stubs

protos: cbir/v1/__init__.py cbir/v1/descriptors.binpb cbir/tfserving/__init__.py ## (re)generate the Python stubs from protos/

test: install browser ## run the whole test suite
	$(PY) -m pytest $(PYTEST_ARGS)

# The search page's browser test drives Debian's headless Chromium (tests/support/browser.py). As root
# with apt it is installed here (instant once present); otherwise that test is skipped and says why.
BROWSER_PACKAGES := chromium chromium-driver
browser: ## install headless Chromium + chromedriver for the browser test (as root, with apt)
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing $(BROWSER_PACKAGES) with apt for the browser test (log: var/apt-browser.log)"; \
	  mkdir -p var; \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y $(BROWSER_PACKAGES) \
	    || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $(BROWSER_PACKAGES); }; } \
	    >var/apt-browser.log 2>&1 \
	    || echo "warning: apt could not install $(BROWSER_PACKAGES) (see var/apt-browser.log); the browser test will be skipped"; \
	else echo "note: $(BROWSER_PACKAGES) are not installed and this is not root with apt: the browser test will be skipped"; fi

test-fast: install ## run the tests not marked slow
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-stateful: install ## the indexer's randomized state-machine test with a long budget (~10 min)
	CBIR_STATEFUL_EXAMPLES=$${CBIR_STATEFUL_EXAMPLES:-1500} $(PY) -m pytest tests/indexer/test_core_stateful.py $(PYTEST_ARGS)

check: install ## what CI checks before the tests: ruff lint, ruff format --check, mypy (strict on the services, lenient on the trainer)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

lint: install ## ruff
	$(VENV)/bin/ruff check .

format: install ## ruff format + import sorting
	$(VENV)/bin/ruff check --fix --select I .
	$(VENV)/bin/ruff format .

clean: ## remove the virtual environment, generated code and local state
	rm -rf $(VENV) cbir/v1 cbir/tfserving var build .pytest_cache .ruff_cache .mypy_cache tests/node/node_modules *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Quickstart (python -m quickstart) and the benchmark report (python -m benchmarks); see quickstart/README.md.
DATA ?=
MODELS ?=
FOLLOW ?=
EVAL ?=
demo: install ## train, export, serve, index, search, evaluate and hot-swap on localhost (DATA=<catalogue> optional)
	$(PY) -m quickstart demo $(if $(DATA),--data $(DATA))

up: install ## start the local stack (model server, indexer, gateway; FOLLOW=1 adds the rollout controller) under var/stack
	$(PY) -m quickstart up $(if $(MODELS),--models $(MODELS)) $(if $(DATA),--catalogue $(DATA)) $(if $(FOLLOW),--follow) $(if $(EVAL),--eval $(EVAL))

down: install ## stop the local stack started by make up
	$(PY) -m quickstart down

status: install ## show the local stack's processes, ports, health and active generation
	$(PY) -m quickstart status

bench: install ## run every benchmark (~20 min on 2 cores); writes var/bench/results.{json,md}
	$(PY) -m benchmarks

bench-quick: install ## smoke run of every benchmark (a few minutes)
	$(PY) -m benchmarks --quick

# Container images for Kubernetes (deploy/docker/, deploy/README.md). Only this target needs a
# container engine: the first of docker/podman whose daemon answers, or CONTAINER_ENGINE=...
IMAGE_REGISTRY ?= registry.example.com/cbir
IMAGE_TAG ?= 0.1.0
CONTAINER_ENGINE ?= $(shell for e in docker podman; do command -v $$e >/dev/null 2>&1 && $$e info >/dev/null 2>&1 && { echo $$e; break; }; done)
IMAGES := services:$(IMAGE_TAG) trainer:$(IMAGE_TAG)-gpu trainer:$(IMAGE_TAG)-cpu

images: ## build the services and trainer images (IMAGE_REGISTRY=... IMAGE_TAG=... PUSH=1 to push)
	@if [ -z "$(CONTAINER_ENGINE)" ]; then \
	  echo "error: make images needs a container engine, and none answers: docker or podman is not installed or its daemon is not running (try 'docker info'). Install one or set CONTAINER_ENGINE=..." >&2; \
	  exit 1; fi
	$(CONTAINER_ENGINE) build -f deploy/docker/services.Dockerfile -t $(IMAGE_REGISTRY)/services:$(IMAGE_TAG) .
	$(CONTAINER_ENGINE) build -f deploy/docker/trainer.Dockerfile -t $(IMAGE_REGISTRY)/trainer:$(IMAGE_TAG)-gpu .
	$(CONTAINER_ENGINE) build -f deploy/docker/trainer.Dockerfile --build-arg TF_IMAGE=tensorflow/tensorflow:2.21.0 \
	  -t $(IMAGE_REGISTRY)/trainer:$(IMAGE_TAG)-cpu .
	$(if $(PUSH),for image in $(IMAGES); do $(CONTAINER_ENGINE) push $(IMAGE_REGISTRY)/$$image || exit 1; done)
