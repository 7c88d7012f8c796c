"""Who may import whom (docs/architecture.md), checked on the source: every import statement
of every module, at any depth (a function-level import counts as much as a top-level one)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> top-level modules it must never import
FORBIDDEN = {
    "rabo": {"grpc", "grpc_health", "coordinator", "worker", "bench", "rabo_proto"},
    "rabo_proto": {"rabo", "coordinator", "worker", "bench"},
    "coordinator": {"worker", "bench"},
    "worker": {"coordinator", "bench"},
    "bench": set(),
}
# the exceptions, by full module name: the wire codec's errors are RaboErrors
ALLOWED = {"rabo_proto": {"rabo.errors"}}


def imports(path: Path, allowed: frozenset[str] | set[str] = frozenset()) -> set[str]:
    """Top-level modules ``path`` imports, leaving out the ``allowed`` full module names."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(n.split(".")[0] for n in names if n not in allowed)
    return found


def sources(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "_pb2" not in p.name)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_only_what_the_layering_allows(package: str) -> None:
    files = sources(package)
    assert files, package
    allowed = ALLOWED.get(package, set())
    bad = {str(p.relative_to(ROOT)): sorted(imports(p, allowed) & FORBIDDEN[package])
           for p in files}
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_check_sees_function_level_imports(tmp_path: Path) -> None:
    """The rule must fail on a deferred import too (the usual way a layer leaks)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from coordinator.server import serve\n    import grpc.aio\n")
    assert imports(f) == {"coordinator", "grpc"}


def test_the_echo_worker_moves_bytes_without_importing_torch() -> None:
    """worker.echo (the load tests' client: dozens of processes on one machine) needs framing,
    checksums and header checks only; importing torch would cost each about a second."""
    import subprocess
    import sys

    code = ("import sys, worker.echo; "
            "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "['numpy']"
