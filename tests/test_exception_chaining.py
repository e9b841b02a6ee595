"""An except block that raises a different error names the caught one as its cause (`raise X from exc`,
not `from None` and not nothing), so the original error and its traceback survive (issue 13, item 5).
User-facing reports stay one line: the launchers and tools print a UserError's message, not its chain.

Read from the source with `ast`: the package, the launchers, the tools and the benchmarks.
"""
from __future__ import annotations

import ast
import os

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
FOLDERS = ("vlmo_large", "launchers", "tools", "benchmarks")
SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)


def unchained_raises(tree: ast.AST, where: str) -> list[str]:
    """'file:line' of each `raise NewError(...)` inside `except ... as name:` without `from`, or with
    `from None` (a bare `raise` and `raise name` re-raise the caught error itself)."""
    found = []
    for handler in ast.walk(tree):
        if not (isinstance(handler, ast.ExceptHandler) and handler.name):
            continue
        pending = list(handler.body)
        while pending:
            node = pending.pop()
            if isinstance(node, SCOPES):  # code defined here runs later, outside the handler
                continue
            if isinstance(node, ast.Raise) and node.exc is not None:
                dropped = node.cause is None or (isinstance(node.cause, ast.Constant) and node.cause.value is None)
                if dropped and not (isinstance(node.exc, ast.Name) and node.exc.id == handler.name):
                    found.append(f"{where}:{node.lineno}")
            pending.extend(ast.iter_child_nodes(node))
    return found


def test_every_translated_exception_keeps_its_cause():
    found = []
    for folder in FOLDERS:
        for root, _, files in os.walk(os.path.join(REPO, folder)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    with open(path, encoding="utf-8") as handle:
                        found += unchained_raises(ast.parse(handle.read(), path), os.path.relpath(path, REPO))
    assert not found, "raise ... from exc missing at: " + ", ".join(sorted(found))


def test_the_check_tells_chained_from_unchained():
    code = """
try:
    pass
except KeyError as exc:
    raise ValueError("lost")
except OSError as exc:
    raise ValueError("kept") from exc
except TypeError as exc:
    raise exc
except ImportError as exc:
    raise ValueError("dropped") from None
except IndexError as exc:
    def later():
        raise ValueError("not in the handler")
    raise
"""
    assert sorted(unchained_raises(ast.parse(code), "x.py")) == ["x.py:11", "x.py:5"]
