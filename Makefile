# `make demo` and `make test` do all the set-up on a fresh machine: Debian
# packages (as root), the virtualenv, the Rust build. Both are idempotent.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
DEPS_STAMP := $(VENV)/.deps-stamp
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)

# Loom explores interleavings exhaustively; bounded preemptions keep it to
# seconds while still covering every two-preemption schedule.
LOOM_MAX_PREEMPTIONS ?= 2

.PHONY: demo test build lint lint-rust lint-python stubtest format rust-test loom py-test bench system-deps clean wheel wheel-smoke

demo: build
	$(BIN)/feedline bench

test: build system-deps lint rust-test loom py-test wheel-smoke

system-deps:
	@if ! command -v nginx >/dev/null 2>&1 || ! command -v nft >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx nftables iproute2 >/dev/null; \
	  else echo "note: nginx/nftables missing and not root; their tests will skip"; fi; \
	fi

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(DEPS_STAMP): requirements-dev.txt | $(PY)
	$(PY) -m pip install -q --no-cache-dir -r requirements-dev.txt
	touch $@

# torch is large (see requirements-torch.txt): only the targets that run its
# tests or benches install it, with its own stamp.
TORCH_STAMP := $(VENV)/.torch-stamp
# Needs ~4 GiB installed plus the wheels while pip unpacks them, and the Rust
# test builds that follow need room too. On a machine short of disk the
# install is skipped with a warning (test_torch.py then skips) rather than
# failing half-way through with ENOSPC.
TORCH_MIN_FREE_GIB ?= 9
$(TORCH_STAMP): requirements-torch.txt $(DEPS_STAMP)
	@free_gib=$$(( $$(df -Pk $(VENV) | awk 'NR==2 {print $$4}') / 1048576 )); \
	if [ "$$free_gib" -lt $(TORCH_MIN_FREE_GIB) ]; then \
	  echo "WARNING: only $${free_gib} GiB free on $(VENV)'s disk, torch needs $(TORCH_MIN_FREE_GIB):" \
	       "not installing it; the feedline.torch tests will SKIP." >&2; \
	else \
	  $(PY) -m pip install -q --no-deps --no-cache-dir -r requirements-torch.txt && touch $@; \
	fi

# An extension built before the wheel became abi3 (`_core.cpython-3XX-*.so`)
# would shadow the abi3 one (`_core.abi3.so`) in a reused checkout.
build: $(DEPS_STAMP)
	rm -f python/feedline/_core.cpython-*.so
	$(BIN)/maturin develop --release -q

lint: lint-rust lint-python stubtest

lint-rust:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

# ruff and mypy read the sources and _core.pyi: no build and no torch needed.
lint-python: $(DEPS_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# stubtest compares _core.pyi with the built extension, so it needs the build.
stubtest: build
	$(PY) -m mypy.stubtest feedline._core --allowlist stubtest-allowlist.txt

format: $(DEPS_STAMP)
	cargo fmt --all
	$(BIN)/ruff format .

# The wheel users install: abi3 (one wheel for CPython >= 3.11: the buffer
# protocol that Chunk and readinto use is in the limited API from 3.11 on)
# and manylinux2014 (glibc 2.17, the floor of Rust's std): zig links against
# glibc 2.17's symbol versions, where the system linker would tie the wheel
# to this machine's glibc (manylinux_2_34). Its own target dir, so the zig
# build and `maturin develop` do not rebuild each other's C dependencies.
WHEEL_DIR := target/wheels
wheel: $(DEPS_STAMP)
	rm -rf $(WHEEL_DIR)
	CARGO_TARGET_DIR=target/wheel $(BIN)/maturin build --release --zig \
	  --compatibility manylinux2014 -o $(WHEEL_DIR)

# Installs the wheel alone (with only its declared dependencies) into a fresh
# virtualenv and uses it from there: open / stream / cat_ranges over
# replicas; `feedline bench --check` names the extra it needs, then runs
# once the extra is installed. A packaging break fails `make test`.
SMOKE_VENV := target/wheel-venv
wheel-smoke: wheel
	rm -rf $(SMOKE_VENV)
	python3 -m venv $(SMOKE_VENV)
	cd / && env -u VIRTUAL_ENV PYTHONNOUSERSITE=1 $(abspath $(SMOKE_VENV))/bin/pip install -q $(abspath $(wildcard $(WHEEL_DIR)/feedline-*.whl))
	cd / && env -u VIRTUAL_ENV $(abspath $(SMOKE_VENV))/bin/python -I $(abspath tests/wheel_smoke.py)
	cd / && out=$$(env -u VIRTUAL_ENV $(abspath $(SMOKE_VENV))/bin/feedline bench --check 2>&1); rc=$$?; \
	  echo "$$out"; test $$rc = 2 && echo "$$out" | grep -qF "pip install 'feedline[bench]'" \
	  && ! echo "$$out" | grep -q Traceback
	cd / && env -u VIRTUAL_ENV $(abspath $(SMOKE_VENV))/bin/pip install -q "$$(ls $(abspath $(WHEEL_DIR))/feedline-*.whl)[bench]"
	cd / && env -u VIRTUAL_ENV $(abspath $(SMOKE_VENV))/bin/feedline bench --check

rust-test:
	cargo test -p feedline-core -p feedline-proxy

loom:
	RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=$(LOOM_MAX_PREEMPTIONS) CARGO_TARGET_DIR=target/loom \
	  cargo test -p feedline-core --release --test loom

py-test: build system-deps $(TORCH_STAMP)
	$(BIN)/pytest

bench: build system-deps $(TORCH_STAMP)
	mkdir -p bench-out
	$(BIN)/pytest benches -p no:cacheprovider --benchmark-only --benchmark-columns=min,median,max,rounds \
	  -o testpaths=benches -o timeout=1200 --benchmark-json=bench-out/pytest-benchmark.json $(BENCH_ARGS)
	$(PY) benches/report.py bench-out/pytest-benchmark.json
	cargo bench -p feedline-core --bench ring -- --quick
	cargo bench -p feedline-core --bench route -- --quick

clean:
	rm -rf target $(VENV)
