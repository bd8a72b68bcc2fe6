"""The house keeps its layers (ARCHITECTURE.md, "Layers"): every import of the project's own modules, at module
level or inside a function, goes to the same layer or one below; no import cycles; no private names imported
across modules; the project's own modules imported at module level (a deferred import only for a heavy optional
dependency, marked ``# deferred: <why>``). Run this file as a script to list every offence."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("volinfer", "converters")

#: Layers, bottom first. A module's layer is that of its longest matching prefix.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("volinfer.errors", "volinfer.portable", "volinfer.validate", "volinfer.options", "volinfer.version",
              "volinfer.noise", "volinfer.progress", "volinfer.watchdog")),
    ("io", ("volinfer.io",)),
    ("tiling", ("volinfer.tiling",)),
    ("model", ("volinfer.model",)),
    ("run", ("volinfer.run",)),
    ("front", ("volinfer", "volinfer.api", "volinfer.cli", "volinfer.cliutil", "volinfer.describe", "volinfer.demo",
               "volinfer.bench", "converters")),
]


def layer(module: str) -> int:
    best, level = -1, -1
    for n, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, level = len(p), n
    assert level >= 0, f"{module} is in no layer: add it to LAYERS and to ARCHITECTURE.md"
    return level


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _targets(mods: dict[str, Path], current: str, node: ast.AST) -> list[tuple[str, str | None]]:
    """(module, imported name or None) for each of the project's modules ``node`` imports."""
    if isinstance(node, ast.Import):
        return [(a.name, None) for a in node.names if a.name in mods]
    assert isinstance(node, ast.ImportFrom)
    base = node.module or ""
    if node.level:
        parts = current.split(".")
        if mods[current].name != "__init__.py":
            parts = parts[:-1]
        parts = parts[: len(parts) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
    out = []
    for a in node.names:
        if f"{base}.{a.name}" in mods:
            out.append((f"{base}.{a.name}", None))
        elif base in mods:
            out.append((base, a.name))
    return out


def imports() -> tuple[dict[str, set[str]], list[str]]:
    """The import graph of the project's modules, and its offences other than cycles."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    bad: list[str] = []
    for m, path in mods.items():
        src = path.read_text()
        tree = ast.parse(src, str(path))
        deferred = {id(sub) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                    for sub in ast.walk(fn) if isinstance(sub, (ast.Import, ast.ImportFrom))}
        lines = src.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            found = [t for t in _targets(mods, m, node) if t[0] != m]
            for target, name in found:
                graph[m].add(target)
                if layer(target) > layer(m):
                    bad.append(f"{m} ({LAYERS[layer(m)][0]}) imports {target} ({LAYERS[layer(target)][0]}): upward")
                if name and name.startswith("_") and not name.startswith("__"):
                    bad.append(f"{m} imports the private name {target}.{name}")
            text = " ".join(lines[node.lineno - 1: node.end_lineno])
            if found and id(node) in deferred and "# deferred:" not in text:
                bad.append(f"{m}:{node.lineno} imports {found[0][0]} inside a function (move it to module level, "
                           f"or mark a heavy optional dependency '# deferred: why')")
    return graph, bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_imports_only_go_down_with_no_cycles_and_no_private_names() -> None:
    graph, bad = imports()
    bad += [f"import cycle: {' <-> '.join(c)}" for c in cycles(graph)]
    assert not bad, "the layers are broken (see ARCHITECTURE.md):\n" + "\n".join(bad)


def test_the_checker_sees_what_it_must_refuse(tmp_path: Path) -> None:
    """The graph builder resolves relative and deferred imports (a checker that sees nothing passes anything)."""
    graph, _ = imports()
    assert "volinfer.run.pipeline" in graph["volinfer.api"]  # absolute, module level
    assert "converters.sources" in graph["converters.convert"] or "converters.sources" in graph["converters.cli"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer("volinfer.io.reader") < layer("volinfer.model.tile_model") < layer("volinfer.run.stream")
    assert layer("volinfer.tiling.geometry") < layer("volinfer.model.tiling_check")


if __name__ == "__main__":
    g, problems = imports()
    for line in problems + [f"import cycle: {' <-> '.join(c)}" for c in cycles(g)]:
        print(line)
