"""The layer rules, checked on the source (an AST test instead of an import-linter contract): networks import no
sampler, math or CLI; sampling imports no trainer, CLI or server; the library imports no CLI or server; and no
package outside pipeline.py calls a private method of DiffusionLM (control, server and eval stand on its public
API)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "dlm"
FILES = sorted(p for p in SRC.rglob("*.py"))


def _module(path: Path) -> str:
    return ".".join(("dlm", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    """Every dlm module a file imports, at the top or inside functions (lazy imports count too)."""
    tree = ast.parse(path.read_text())
    # A `python -m dlm.x` entry point (`if __name__ == "__main__":`) is a shell, like the CLI: not counted.
    main_blocks = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
    skip = {id(m) for b in main_blocks for m in ast.walk(b)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("dlm")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dlm"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


RULES = [  # (modules under this prefix, may not import these prefixes)
    ("dlm.models", ("dlm.sampling", "dlm.losses", "dlm.trainer", "dlm.train", "dlm.cli", "dlm.server",
                    "dlm.control", "dlm.eval", "dlm.pipeline")),
    ("dlm.sampling", ("dlm.trainer", "dlm.train", "dlm.cli", "dlm.server", "dlm.eval")),
    ("dlm", ("dlm.cli", "dlm.server")),
]


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_layer_rules(path):
    mod = _module(path)
    if mod == "dlm.cli" or mod.startswith("dlm.server") or mod == "dlm":
        return  # the shells, and the package's lazy re-exports
    for prefix, banned in RULES:
        if mod == prefix or mod.startswith(prefix + "."):
            bad = sorted(i for i in _imports(path) if any(i == b or i.startswith(b + ".") for b in banned))
            assert not bad, f"{mod} imports {bad}"


@pytest.mark.parametrize("path", [p for p in FILES if p.name != "pipeline.py"], ids=lambda p: str(p.relative_to(SRC)))
def test_no_private_diffusionlm_calls_outside_the_pipeline(path):
    """`lm._x(...)` / `self.lm._x(...)` on a DiffusionLM: use its public API (options, denoise, fill, ...)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = ast.unparse(node.value)
            assert owner not in ("lm", "self.lm"), f"{path.name}:{node.lineno} uses {owner}.{node.attr}"


def _top_level_imports(path: Path, mods: set[str]) -> set[str]:
    """The dlm modules a file imports at module level (not under TYPE_CHECKING or `__main__`, not in functions)."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dlm"):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                out.add(full if full in mods else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("dlm")}
    return {m for m in out if m in mods}


def test_no_import_cycles_among_top_level_imports():
    mods = {_module(p): p for p in FILES}
    graph = {m: _top_level_imports(p, set(mods)) - {m} for m, p in mods.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [m, d]))
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_import_dlm_is_cheap():
    import subprocess
    import sys

    code = ("import sys; import dlm; print(sum(m.startswith('dlm') for m in sys.modules), 'torch' in sys.modules);"
            "dlm.GenerationConfig; print(dlm.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "1" and out[1] == "False", out  # only the package itself; no torch until a name is used
