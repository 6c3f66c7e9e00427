"""``pip install .`` without the ``flow`` extra: the golden model and the hardware still work.

Each check runs in a fresh interpreter (this one) whose import system refuses the flow extra's
modules (torch, transformers, accelerate, gguf, matplotlib) as if they were not installed, and
logs every attempt to import one: the hw/golden commands must succeed without a single attempt;
the commands that need the extra must say so in one line, exit status 2.  The RTL engine
(``matmul --engine rtl``, regressions) is covered by the import checks only: its Verilator
build takes ~40 s.
"""

import ast
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from flexcim.extras import FLOW_MODULES

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Prepended to every child's code: a meta-path finder that refuses the flow extra's modules
# (ModuleNotFoundError, as when they are absent) and appends each refused name to BLOCK_LOG.
BLOCKER = f"""
import os, sys
class _NoFlowExtra:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {FLOW_MODULES!r}:
            with open(os.environ["BLOCK_LOG"], "a") as f:
                f.write(name + "\\n")
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _NoFlowExtra())
"""
CLI = "from flexcim.cli import main; sys.exit(main(sys.argv[1:]))"


def without_flow(tmp_path, code, *argv, timeout=600):
    """Run ``code`` after the blocker in a child in ``tmp_path``; returns the finished
    process and the names it tried to import from the flow extra."""
    log = tmp_path / "blocked.txt"
    log.write_text("")
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKER + code, *map(str, argv)], cwd=tmp_path,
        env={**os.environ, "BLOCK_LOG": str(log)}, capture_output=True,
        text=True, timeout=timeout,
    )
    return proc, log.read_text().split()


def test_hw_and_golden_commands_run_without_the_flow_extra(operands):
    tmp_path, x, w = operands
    runs = [
        ("--help",),
        ("verilog", "--preset", "tiny", "-o", tmp_path / "v" / "tiny.v"),
        ("matmul", "--engine", "golden", "--x", "x.npy", "--w", "w.npy", "--pattern", "2:8",
         "-o", "y.npy"),
        ("system", "--model-config", "smollm2-135m", "--pattern", "2:4"),
    ]
    (tmp_path / "v").mkdir()
    for argv in runs:
        proc, blocked = without_flow(tmp_path, CLI, *argv)
        assert proc.returncode == 0, (argv, proc.stderr)
        assert blocked == [], (argv, blocked)
    assert (tmp_path / "v" / "tiny.v").is_file()
    assert np.array_equal(np.load(tmp_path / "y.npy"), x.astype(np.int64) @ w.T.astype(np.int64))


def test_hw_golden_sim_modules_and_parser_import_nothing_of_the_flow_extra(tmp_path):
    # Every module of spec/, golden/, hw/ and sim/ (the RTL engine and the regressions too) and
    # the whole command line's parser; spec/, golden/ and hw/ must not even load flexcim.flow.
    code = """
import importlib, pkgutil
import flexcim.spec, flexcim.golden, flexcim.hw, flexcim.sim
def load(pkg):
    for m in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + "."):
        importlib.import_module(m.name)
load(flexcim.spec); load(flexcim.golden); load(flexcim.hw)
assert not [m for m in sys.modules if m.startswith("flexcim.flow")], "spec/golden/hw load flow/"
load(flexcim.sim)
from flexcim.cli import build_parser
build_parser()
"""
    proc, blocked = without_flow(tmp_path, code)
    assert proc.returncode == 0, proc.stderr
    assert blocked == []


@pytest.mark.parametrize("folder", ["spec", "golden", "hw"])
def test_golden_and_hw_never_import_flow_or_its_extra(folder):
    # Also the imports inside functions (which the module import above does not run).
    bad = []
    for path in sorted((ROOT / folder).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name.split(".")[0] in FLOW_MODULES or name.startswith("flexcim.flow"):
                    bad.append(f"{path.name}:{node.lineno} {name}")
    assert bad == []


@pytest.mark.parametrize("argv, command", [
    (("flow", "select", "-o", "plan.json"), "flexcim flow select"),
    (("flow", "prune", "--plan", "plan.json", "-o", "pruned"), "flexcim flow prune"),
    (("flow", "act-eval"), "flexcim flow act-eval"),
    (("flow", "export", "--plan", "plan.json", "--layer", "model.layers.0.mlp.up_proj",
      "-o", "l.safetensors"), "flexcim flow export"),
    (("demo", "--out", "out"), "flexcim demo"),
])
def test_flow_commands_without_the_extra_name_it_in_one_line(tmp_path, argv, command):
    proc, _ = without_flow(tmp_path, CLI, *argv)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (f"flexcim: error: '{command}' needs the flow extra (no module "
                           f"'torch'): pip install 'flexcim[flow]'\n")
    assert proc.stdout == ""
    assert not (tmp_path / "out").exists()  # checked before any work


def test_flow_module_missing_inside_a_handler_is_one_line(tmp_path):
    # Past the up-front check (say a flow extra installed in part): the missing module of the
    # extra that a handler reaches is still one line, exit 2, naming the extra.
    code = ("import flexcim.extras; flexcim.extras.require_flow = lambda *a, **k: None\n"
            + CLI)
    proc, blocked = without_flow(tmp_path, code, "flow", "select", "-o", "plan.json")
    assert blocked and proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert "'flexcim flow select' needs the flow extra" in proc.stderr
    assert "pip install 'flexcim[flow]'" in proc.stderr


def test_regress_real_layer_without_the_extra_names_it_and_no_real(tmp_path):
    pytest.importorskip("cocotb_tools")
    from flexcim.sim import runner

    if not runner.available("verilator"):
        pytest.skip("no Verilator: the real layer is not part of the sweep")
    code = "import runpy; runpy.run_module('flexcim.sim.regress', run_name='__main__')"
    proc, _ = without_flow(tmp_path, code, "--preset", "default", "--sim", "verilator")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        "regress: error: the real SmolLM2 layer needs the flow extra (no module 'torch'): "
        "pip install 'flexcim[flow]', or leave it out with --no-real")
    assert "Traceback" not in proc.stderr
