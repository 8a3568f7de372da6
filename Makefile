# Two commands: `make run` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test bench chaos check clean system-deps

run: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/fdsupervisor run units/

test: $(STAMP)
	$(BIN)/ruff check fdsupervisor tests bench contrib
	$(BIN)/ruff format --check -q fdsupervisor tests bench contrib
	$(BIN)/mypy
	$(BIN)/pytest -q

check: $(STAMP)
	$(BIN)/fdsupervisor check units/

# Benchmarks need their peers: circus from PyPI (the bench extra), QEMU and
# systemd-socket-activate from Debian (qemu-system-x86, systemd), gcc for the C workers.
bench: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python bench/run_all.py

chaos: $(STAMP)
	FDSUP_CHAOS_SECONDS=120 $(BIN)/pytest -q --timeout 600 tests/integration/test_chaos.py

# systemd-python compiles against libsystemd: install the headers where missing.
system-deps:
	@if ! pkg-config --exists libsystemd 2>/dev/null; then \
	    echo "installing libsystemd-dev and pkg-config with apt-get"; \
	    $(SUDO) apt-get update -q && \
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q libsystemd-dev pkg-config; \
	fi

$(STAMP): pyproject.toml fdsupervisor/_spawn.c | system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,lint]'
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
