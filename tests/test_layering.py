"""The import layering of the project folders (docs/architecture.md, Layering).

The spec (N:M format, hardware config, data layouts, timing contract) is at the bottom; golden/
and hw/ stand on it and never on each other; sim/ checks hw/ against golden/ and stands on all
three; flow/ stands beside them on the spec and golden/.  The base utilities of flexcim/ (errors,
fileio, process, extras) may be imported from anywhere; the top of flexcim/ (cli, demo, report,
system) from none of these folders.  Every import counts, including those inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FOLDERS = ("spec", "golden", "hw", "sim", "flow")
"""Folders checked: each is the package ``flexcim.<folder>``."""

BASE = frozenset({"flexcim.errors", "flexcim.fileio", "flexcim.process", "flexcim.extras"})
"""Base utilities any folder may import (and the package ``flexcim`` itself: its version)."""

ALLOWED = {
    "spec": frozenset({"spec"}),
    "golden": frozenset({"spec", "golden"}),
    "hw": frozenset({"spec", "hw"}),
    "sim": frozenset({"spec", "golden", "hw", "sim"}),
    "flow": frozenset({"spec", "golden", "flow"}),
}
"""Project folders each folder may import (besides :data:`BASE`)."""

EXCEPTIONS = {
    # The real SmolLM2 layer of the regressions is exported by flow/ on first use (a lazy import
    # behind the flow extra, flexcim.extras.require_flow); sim/ uses nothing else of flow/.
    ("sim/real.py", "flexcim.flow"),
}
"""Single (file, module) edges allowed outside :data:`ALLOWED`, each for a stated reason."""


def _is_module(name: str) -> bool:
    """Whether ``flexcim.<name>`` is a module or package (not a name of flexcim/__init__.py)."""
    return name in FOLDERS or (ROOT / "flexcim" / f"{name}.py").is_file()


def _imports(path: Path, package: str):
    """``(line, module)`` of every import of a ``flexcim`` module in ``path`` (relative ones
    resolved against ``package``, the file's package), at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            if module == "flexcim":
                # ``from flexcim import hw`` imports the module flexcim.hw; ``from flexcim import
                # __version__`` a name of the package itself.
                for alias in node.names:
                    sub = _is_module(alias.name)
                    yield node.lineno, f"flexcim.{alias.name}" if sub else "flexcim"
            else:
                yield node.lineno, module


def _folder_of(module: str) -> str | None:
    """The project folder (or ``"flexcim"``) a module belongs to; None outside the project."""
    parts = module.split(".")
    if parts[0] != "flexcim":
        return None
    if len(parts) > 1 and parts[1] in FOLDERS:
        return parts[1]
    return "flexcim"


def violations(folders=FOLDERS, root: Path = ROOT) -> list[str]:
    """Every forbidden import edge as ``file:line: folder -> module (why)``."""
    found = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            sub = path.relative_to(root / folder).with_suffix("").parts
            package = ".".join(("flexcim", folder, *sub[:-1]))
            for line, module in sorted(_imports(path, package)):
                target = _folder_of(module)
                if target is None or (rel, module) in EXCEPTIONS:
                    continue
                if target == "flexcim":
                    if module == "flexcim" or module in BASE:
                        continue
                    why = "only flexcim's base utilities (errors, fileio, process, extras)"
                elif target in ALLOWED[folder]:
                    continue
                else:
                    allowed = ", ".join(f"{f}/" for f in sorted(ALLOWED[folder] - {folder}))
                    why = f"{folder}/ may import only {allowed or 'the base utilities'}"
                found.append(f"{rel}:{line}: {folder} -> {module} ({why})")
    return found


def test_folders_exist():
    for folder in FOLDERS:
        assert (ROOT / folder / "__init__.py").is_file(), f"{folder}/ is not a package"


@pytest.mark.parametrize("folder", FOLDERS)
def test_layering(folder):
    found = violations([folder])
    assert not found, "forbidden import edges:\n" + "\n".join(found)


def test_exceptions_still_needed():
    """An exception whose edge is gone is removed from :data:`EXCEPTIONS`."""
    for rel, module in EXCEPTIONS:
        folder = rel.split("/")[0]
        sub = Path(rel).relative_to(folder).with_suffix("").parts
        package = ".".join(("flexcim", folder, *sub[:-1]))
        modules = {m for _, m in _imports(ROOT / rel, package)}
        assert module in modules, f"{rel} no longer imports {module}: drop the exception"


def test_checker_flags_a_forbidden_edge(tmp_path):
    """The checker names file, line and edge, for imports at any depth and every spelling."""
    (tmp_path / "golden").mkdir()
    (tmp_path / "golden" / "x.py").write_text(
        "import flexcim.errors\n"
        "from flexcim.spec import nm\n"
        "def f():\n"
        "    from flexcim.hw import top\n"
        "    import flexcim.cli\n"
        "    from flexcim import sim\n"
        "    from ..hw.config import HwConfig\n"
        "    from flexcim import __version__, fileio\n"
    )
    found = violations(["golden"], tmp_path)
    assert [f.split(" (")[0] for f in found] == [
        "golden/x.py:4: golden -> flexcim.hw",
        "golden/x.py:5: golden -> flexcim.cli",
        "golden/x.py:6: golden -> flexcim.sim",
        "golden/x.py:7: golden -> flexcim.hw.config",
    ]
