"""The package's layers, read from the source: the ADM core and the infrastructure never import a
distillation method, infrastructure does not reach up into the training loop, and module-level imports
have no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "guided_diffusion"
CORE = {
    "unet", "dit", "gaussian_diffusion", "respace", "script_util", "nn", "losses", "train_util", "logger",
    "dist_util", "resample", "image_datasets", "sampling", "config", "model_cost", "ddpm_unet",
    "ddpm_diffusion", "step_target",
}
ABOVE_INFRA = ("guided_diffusion.distill", "guided_diffusion.train_util", "guided_diffusion.run_setup",
               "guided_diffusion.sampling", "guided_diffusion.digits_demo", "guided_diffusion.config")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """Absolute names of the guided_diffusion modules `path` imports (TYPE_CHECKING blocks skipped)."""
    tree = ast.parse(path.read_text())
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                module = ".".join([*base, *(node.module.split(".") if node.module else [])])
                for alias in node.names:
                    found.add(f"{module}.{alias.name}" if not node.module or node.level else module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            if not top_level_only or isinstance(node, ast.If | ast.Try):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    children = getattr(node, field, [])
                    visit([c for c in children if isinstance(c, ast.stmt | ast.ExceptHandler)])
                if isinstance(node, ast.ExceptHandler):
                    visit(node.body)

    visit(tree.body)
    return {m for m in found if m.startswith("guided_diffusion")}


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module a dotted import name refers to (`pkg.mod.func` -> `pkg.mod`)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def test_core_and_infrastructure_never_import_a_method():
    for name, path in _modules().items():
        short = name.removeprefix("guided_diffusion.")
        if short in CORE or short.startswith("infra"):
            bad = sorted(m for m in _imports(path, False) if m.startswith("guided_diffusion.distill"))
            assert not bad, f"{name} imports {bad}"
        if short.startswith("infra"):
            bad = sorted(m for m in _imports(path, True) if m.startswith(ABOVE_INFRA))
            assert not bad, f"{name} imports {bad}"


def test_module_level_imports_have_no_cycle():
    modules = _modules()
    graph = {
        name: {r for m in _imports(path, True) if (r := _resolve(m, modules)) and r != name}
        for name, path in modules.items()
    }
    # packages import their __init__ on the way; an edge to a package is an edge to its __init__ only
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_checker_sees_a_cycle(tmp_path, monkeypatch):
    pkg = tmp_path / "guided_diffusion"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("from guided_diffusion.a import y\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    try:
        test_module_level_imports_have_no_cycle()
    except AssertionError as exc:
        assert "guided_diffusion.a -> guided_diffusion.b -> guided_diffusion.a" in str(exc)
    else:
        raise AssertionError("the cycle was not found")


def test_no_module_imports_by_string():
    """Methods are found through their registration (distill/__init__ registers the built-in ones), never by
    importing a module named in a string: every dependency is a visible import statement."""
    for name, path in _modules().items():
        source = path.read_text()
        for call in ("import_module(", "__import__(", "find_spec("):
            assert call not in source, f"{name} calls {call}...)"
