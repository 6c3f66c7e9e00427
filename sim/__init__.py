"""Co-simulation of the generated RTL with cocotb 2.x on Verilator and Icarus."""
