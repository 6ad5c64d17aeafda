# The two commands a new user needs: `make demo` and `make test`. Both set up .venv if missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
CACHE  := $(CURDIR)/.cache
export TORCHINDUCTOR_CACHE_DIR := $(CACHE)/inductor
export TORCH_EXTENSIONS_DIR := $(CACHE)/torch_extensions
export PYTHONHASHSEED := 0

.PHONY: setup kernels demo test bench lint format clean redis-server

setup: $(STAMP)

# Idempotent: reinstalls only when the project's requirements change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	$(PIP) install -q -c constraints.txt fbgemm-gpu-cpu torchmetrics tensordict pyre-extensions
	$(PIP) install -q -c constraints.txt --no-deps torchrec
	touch $(STAMP)

# The C++ row kernels compile on first use (1-2 min here, up to 10 in the VM's slow phases) and
# are cached in $(TORCH_EXTENSIONS_DIR): built here, so that no test pays for the build inside
# its 600 s time limit.
kernels: setup
	$(PY) -m longrec.nn.row_kernels

demo: setup kernels
	$(PY) -m longrec demo --out $(CACHE)/demo

# The history-store tests start their own Redis (Debian's redis-server); install it if missing.
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
redis-server:
	@command -v redis-server >/dev/null || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server; }

test: setup redis-server kernels
	$(PY) -m pytest -q

bench: setup kernels
	$(PY) -m longrec bench all --out benchmarks/results

lint: setup
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

format: setup
	$(VENV)/bin/ruff format src tests
	$(VENV)/bin/ruff check --fix src tests

clean:
	rm -rf $(CACHE) .pytest_cache .ruff_cache
