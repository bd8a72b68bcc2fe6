"""The code stays readable: no function of volinfer/ or converters/ (private ones included) takes more than 8
parameters or is longer than 60 lines (settings travel as values, steps are small). Run this file as a script to
list every function over the limits."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_PARAMS = 8
MAX_LINES = 60

#: Functions that may stay over a limit, with why. Keep it short.
ALLOWED: dict[str, str] = {}


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = fn.args
    n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + (a.vararg is not None) + (a.kwarg is not None)
    if a.args and a.args[0].arg in ("self", "cls"):
        n -= 1
    return n


def offenders() -> list[str]:
    """``path:function: what`` for every function over a limit (parameters counted for public functions only)."""
    out = []
    for package in ("volinfer", "converters"):
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                name = f"{path.relative_to(ROOT)}:{node.name}"
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                params = _params(node)
                if params > MAX_PARAMS and name not in ALLOWED:
                    out.append(f"{name}: {params} parameters")
                if lines > MAX_LINES and name not in ALLOWED:
                    out.append(f"{name}: {lines} lines")
    return out


def test_no_function_over_the_limits() -> None:
    found = offenders()
    assert not found, "functions over the limits (split them, or pass settings objects):\n" + "\n".join(found)


if __name__ == "__main__":
    for line in offenders():
        print(line)
