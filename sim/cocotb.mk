# `make sim` through cocotb's own Makefiles (the second way to run the FlexCiM testbench).
# Invoked by the top-level Makefile after `python -m flexcim.sim.regress --emit DIR` wrote
# DIR/flexcim_top.v and DIR/hw_config.json; variables: SIM, PRESET, PATTERN, DIR, and the
# usual cocotb ones (WAVES=1, COCOTB_RANDOM_SEED=..., COCOTB_TEST_FILTER=...).
SIM ?= verilator
PATTERN ?= 2:4
TOPLEVEL_LANG = verilog
VERILOG_SOURCES = $(DIR)/flexcim_top.v
# The module name comes from the config, as flexcim.sim.regress.toplevel names it.
COCOTB_TOPLEVEL = $(shell python -c 'from flexcim.spec.config import HwConfig; from flexcim.sim.regress import toplevel; print(toplevel(HwConfig.load("$(DIR)/hw_config.json")))')
COCOTB_TEST_MODULES = flexcim.sim.tb
SIM_BUILD = $(DIR)/sim_build-$(SIM)
COCOTB_RESULTS_FILE = $(DIR)/results-$(SIM).xml
# Amaranth writes no `timescale; without one Icarus runs at 1 s precision.
COCOTB_HDL_TIMEUNIT = 1ns
COCOTB_HDL_TIMEPRECISION = 1ps
ifeq ($(SIM),verilator)
# The runner's flags (sim/runner.py VERILATOR_ARGS: WIDTH lint waived, build-speed flags,
# ports-only VPI); cocotb's --public-flat-rw is filtered out below its include.
COMPILE_ARGS += $(shell python -c 'from flexcim.sim import runner; print(" ".join(runner.VERILATOR_ARGS))')
else
# Verilog-2005, not cocotb's -g2012: see ICARUS_ARGS in sim/runner.py (a later -g wins).
COMPILE_ARGS += -g2005
endif
export FLEXCIM_HW_CONFIG := $(shell cat $(DIR)/hw_config.json)
export FLEXCIM_CASE := {"pattern": "$(PATTERN)"}
export COCOTB_RESULTS_FILE

include $(shell cocotb-config --makefiles)/Makefile.sim
# Every net public makes the default preset's build several times longer; the TB needs ports.
# (Recipes expand COMPILE_ARGS when they run, so this filter applies after Makefile.sim's +=.)
COMPILE_ARGS := $(filter-out --public-flat-rw,$(COMPILE_ARGS))
