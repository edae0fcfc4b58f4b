"""The station runtime (``edge/`` and ``hemaedge/``) must run on CPython 3.8: JetPack 5's Python.

JetPack 5 (L4T R35) ships Python 3.8 and TensorRT Python bindings built only for it, so a
JetPack 5 station with TensorRT needs the runtime on 3.8. The workstation side (``export/``,
``calibration/``) needs torch 2.x and stays on >= 3.9; these tests do not look at it.

Two tiers:

* a static check that runs everywhere (any Python >= 3.8, no 3.8 interpreter needed): every
  runtime file parses with the 3.8 grammar, and nothing evaluated at run time uses a 3.9+
  construct the grammar cannot see (``list[int]`` or ``X | None`` outside annotations, ``dict | dict``,
  ``str.removeprefix``, ``functools.cache``, ``zip(strict=...)``, ...). It knows a list of such
  constructs, so it can miss one it does not know; the second tier is the real proof;
* a real run under a ``python3.8`` found on this machine (PATH or pyenv), when that interpreter has
  the runtime dependencies (numpy, onnxruntime, cv2, rich): import every runtime module and classify
  a batch of a tiny test bundle with ONNX Runtime. Skipped, with the reason, when there is none.
  ``tools/py38_check.sh`` makes such a venv and runs the whole suite in it (workstation tests skip
  there: no torch).
"""

from __future__ import annotations

import ast
import glob
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_PACKAGES = (
    "edge",
    "hemaedge",
    "evaluation",
    "calibration",
)  # calibration: evaluate reads labelled folders with it
RUNTIME_FILES = sorted(p for pkg in RUNTIME_PACKAGES for p in (ROOT / pkg).rglob("*.py"))

# Builtins and stdlib classes that are subscriptable at run time only from 3.9 (PEP 585).
GENERIC_BUILTINS = {"list", "dict", "tuple", "set", "frozenset", "type"}
GENERIC_MODULES = {
    "collections",
    "collections.abc",
    "re",
    "queue",
    "contextlib",
    "os",
    "weakref",
    "concurrent.futures",
    "asyncio",
    "itertools",
    "functools",
    "subprocess",
}
GENERIC_LOWERCASE = {"defaultdict", "deque"}  # other generic classes there are capitalised (os.environ[...] is not one)
NUMPY_GENERICS = {"ndarray", "dtype"}  # np.ndarray[...] / np.dtype[...] need 3.9 (npt.NDArray is fine)
# (module, name) that exist only from 3.9 or later.
NEW_NAMES = {
    ("functools", "cache"): "3.9",
    ("math", "lcm"): "3.9",
    ("math", "nextafter"): "3.9",
    ("math", "ulp"): "3.9",
    ("itertools", "pairwise"): "3.10",
    ("itertools", "batched"): "3.12",
    ("argparse", "BooleanOptionalAction"): "3.9",
    ("sys", "stdlib_module_names"): "3.10",
    ("importlib.metadata", "packages_distributions"): "3.10",
    ("importlib.resources", "files"): "3.9",
    ("asyncio", "to_thread"): "3.9",
    ("hashlib", "file_digest"): "3.11",
    ("ast", "unparse"): "3.9",
    ("contextlib", "chdir"): "3.11",
    ("contextlib", "aclosing"): "3.10",
    ("enum", "StrEnum"): "3.11",
    ("datetime", "UTC"): "3.11",
    ("dataclasses", "KW_ONLY"): "3.10",
    ("types", "GenericAlias"): "3.9",
    **{
        ("typing", n): "3.9+"
        for n in (
            "Annotated",
            "TypeAlias",
            "ParamSpec",
            "Concatenate",
            "TypeGuard",
            "Self",
            "Never",
            "LiteralString",
            "Unpack",
            "TypeVarTuple",
            "Required",
            "NotRequired",
            "dataclass_transform",
            "override",
            "assert_never",
            "assert_type",
            "reveal_type",
            "is_typeddict",
        )
    },
}
NEW_MODULES = {"zoneinfo": "3.9", "graphlib": "3.9", "tomllib": "3.11"}
# Methods of builtin / stdlib types new in 3.9+ (flagged whatever object they are called on).
NEW_METHODS = {
    "removeprefix": "3.9",
    "removesuffix": "3.9",
    "is_relative_to": "3.9",
    "with_stem": "3.9",
    "bit_count": "3.10",
    "hardlink_to": "3.10",
    "randbytes": "3.9",
}
# Keyword arguments new in 3.9+: (function name, keyword).
NEW_KEYWORDS = {
    ("zip", "strict"): "3.10",
    ("dataclass", "slots"): "3.10",
    ("dataclass", "kw_only"): "3.10",
    ("field", "kw_only"): "3.10",
    ("shutdown", "cancel_futures"): "3.9",
    ("ArgumentParser", "exit_on_error"): "3.9",
    ("get_type_hints", "include_extras"): "3.9",
    ("TemporaryDirectory", "ignore_cleanup_errors"): "3.10",
    ("rmtree", "onexc"): "3.12",
    ("entry_points", "group"): "3.10",
    ("bisect", "key"): "3.10",
    ("bisect_left", "key"): "3.10",
    ("bisect_right", "key"): "3.10",
    ("insort", "key"): "3.10",
}


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


class _Checker(ast.NodeVisitor):
    """Finds 3.9+ constructs that are evaluated at run time (annotations are skipped when postponed)."""

    def __init__(self, tree: ast.Module):
        self.problems: list[tuple[int, str]] = []
        self.postponed = any(
            isinstance(n, ast.ImportFrom) and n.module == "__future__" and any(a.name == "annotations" for a in n.names)
            for n in tree.body
        )
        self.origin: dict[str, str] = {}  # local name -> "module" or "module.name"
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    self.origin[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:
                    self.origin[a.asname or a.name] = f"{node.module}.{a.name}"

    def _resolve(self, node: ast.AST) -> str | None:
        name = _dotted(node)
        if name is None:
            return None
        head, _, rest = name.partition(".")
        full = self.origin.get(head, head)
        return f"{full}.{rest}" if rest else full

    def flag(self, node: ast.AST, what: str) -> None:
        self.problems.append((getattr(node, "lineno", 0), what))

    # annotations: not evaluated when postponed (from __future__ import annotations)
    def _annotation(self, node: ast.AST | None) -> None:
        if node is not None and not self.postponed:
            self.visit(node)

    def visit_arg(self, node: ast.arg) -> None:
        self._annotation(node.annotation)

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for d in node.decorator_list:
            self.visit(d)
        self.visit(node.args)
        self._annotation(node.returns)
        for stmt in node.body:
            self.visit(stmt)

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self._annotation(node.annotation)
        if node.value is not None:
            self.visit(node.value)

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            if a.name.split(".")[0] in NEW_MODULES:
                self.flag(node, f"module {a.name} (Python {NEW_MODULES[a.name.split('.')[0]]})")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        mod = node.module or ""
        if mod.split(".")[0] in NEW_MODULES:
            self.flag(node, f"module {mod} (Python {NEW_MODULES[mod.split('.')[0]]})")
        for a in node.names:
            if (mod, a.name) in NEW_NAMES:
                self.flag(node, f"from {mod} import {a.name} (Python {NEW_NAMES[(mod, a.name)]})")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        full = self._resolve(node)
        if full:
            mod, _, name = full.rpartition(".")
            if (mod, name) in NEW_NAMES:
                self.flag(node, f"{full} (Python {NEW_NAMES[(mod, name)]})")
        if node.attr in NEW_METHODS:
            self.flag(node, f".{node.attr}() (Python {NEW_METHODS[node.attr]})")
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        full = self._resolve(node.value)
        if full:
            mod, _, name = full.rpartition(".")
            if (
                (not mod and full in GENERIC_BUILTINS)
                or self._is_generic(node.value)
                or (mod in ("numpy", "np") and name in NUMPY_GENERICS)
            ):
                self.flag(
                    node,
                    f"{full}[...] evaluated at run time (Python 3.9; use typing.{name.capitalize()} "
                    "or a string / an annotation)",
                )
        self.generic_visit(node)

    def _is_type_expr(self, node: ast.AST) -> bool:
        if isinstance(node, ast.Constant) and node.value is None:
            return True
        full = self._resolve(node)
        if full and (
            full in GENERIC_BUILTINS | {"int", "float", "str", "bytes", "bool", "complex", "object"}
            or full.startswith("typing.")
        ):
            return True
        if isinstance(node, ast.Subscript):  # list[int] | None, but not mask[1:] | mask[:-1]
            return self._is_type_expr(node.value) or self._is_generic(node.value)
        return isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr) and self._is_type_expr(node.left)

    def _is_generic(self, node: ast.AST) -> bool:
        """A stdlib class that became subscriptable in 3.9 (``collections.abc.Callable``, ``queue.Queue``, ...)."""
        mod, _, name = (self._resolve(node) or "").rpartition(".")
        return mod in GENERIC_MODULES and (name[:1].isupper() or name in GENERIC_LOWERCASE)

    def visit_BinOp(self, node: ast.BinOp) -> None:
        if isinstance(node.op, ast.BitOr):
            sides = (node.left, node.right)
            if any(
                isinstance(s, (ast.Dict, ast.DictComp)) or (isinstance(s, ast.Call) and _dotted(s.func) == "dict")
                for s in sides
            ):
                self.flag(node, "dict | dict (Python 3.9; use {**a, **b})")
            elif any(self._is_type_expr(s) for s in sides):
                self.flag(node, "X | Y type union evaluated at run time (Python 3.10; use typing.Union/Optional)")
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        if isinstance(node.op, ast.BitOr) and isinstance(node.value, (ast.Dict, ast.DictComp)):
            self.flag(node, "dict |= dict (Python 3.9; use .update())")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        fname = (_dotted(node.func) or "").rpartition(".")[2]
        for kw in node.keywords:
            if (fname, kw.arg) in NEW_KEYWORDS:
                self.flag(node, f"{fname}({kw.arg}=...) (Python {NEW_KEYWORDS[(fname, kw.arg)]})")
        if fname in ("isinstance", "issubclass") and len(node.args) == 2 and isinstance(node.args[1], ast.BinOp):
            self.flag(node, f"{fname}(x, A | B) (Python 3.10; use a tuple)")
        self.generic_visit(node)


def _problems(path: Path) -> list[str]:
    src = path.read_text(encoding="utf-8")
    rel = path.relative_to(ROOT).as_posix()
    try:
        tree = ast.parse(src, filename=rel, feature_version=(3, 8))
    except SyntaxError as exc:
        return [f"{rel}:{exc.lineno}: not Python 3.8 syntax: {exc.msg}"]
    checker = _Checker(tree)
    checker.visit(tree)
    return [f"{rel}:{line}: {what}" for line, what in sorted(checker.problems)]


def test_runtime_files_found():
    names = {p.relative_to(ROOT).as_posix() for p in RUNTIME_FILES}
    assert {"edge/counting.py", "hemaedge/cli.py", "edge/bundle/manifest.py"} <= names


def test_checker_catches_what_it_claims():
    src = textwrap.dedent("""
        from __future__ import annotations
        import functools
        import os
        import queue
        from collections.abc import Callable, Sequence
        import numpy as np
        Log = Callable[[str], None]
        Pair = tuple[int, int]
        Opt = int | None
        merged = {1: 2} | {3: 4}
        name = "ab".removeprefix("a")
        ok = isinstance(3, int | str)
        pairs = list(zip([1], [2], strict=True))
        arr: np.ndarray[int] = np.zeros(1)
        def f(x: list[int] | None) -> dict[str, int]:
            return {}
        @functools.cache
        def g(): ...
        mask = np.ones(2, bool) | np.zeros(2, bool)
        flags = 1 | 2
        edges = mask[1:] | mask[:-1]
        home = os.environ["HOME"]
        Seq = Sequence[int] | None
        q = queue.Queue[int]()
    """)
    tree = ast.parse(src, feature_version=(3, 8))
    checker = _Checker(tree)
    checker.visit(tree)
    lines = sorted({line for line, _ in checker.problems})
    assert lines == [8, 9, 10, 11, 12, 13, 14, 18, 24, 25], checker.problems  # annotations and array/int '|' are fine
    with pytest.raises(SyntaxError):
        ast.parse("with (open('a') as a, open('b') as b):\n    pass\n", feature_version=(3, 8))


def test_runtime_source_is_python38():
    """No 3.9+ syntax or run-time construct in edge/ and hemaedge/ (see the module docstring)."""
    problems = [p for path in RUNTIME_FILES for p in _problems(path)]
    assert not problems, "the station runtime must run on Python 3.8 (JetPack 5):\n" + "\n".join(problems)


# tools/py38_check.sh's venv (the same default path there).
PY38_VENV = Path(os.environ.get("HEMAEDGE_PY38_VENV", Path.home() / ".cache" / "hemaedge" / "py38-venv"))
PY38_PROBE = "import sys; assert sys.version_info[:2] == (3, 8); import numpy, onnxruntime, cv2, rich"


def _python38() -> tuple[str | None, str]:
    """A CPython 3.8 with the runtime dependencies, else None and why not."""
    candidates = [
        os.environ.get("HEMAEDGE_PY38"),
        str(PY38_VENV / "bin" / "python"),
        shutil.which("python3.8"),
        *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.8*/bin/python3.8"))),
    ]
    found = [p for p in dict.fromkeys(candidates) if p and os.path.isfile(p) and os.access(p, os.X_OK)]
    if not found:
        return None, "no python3.8 on this machine (HEMAEDGE_PY38, PATH or ~/.pyenv); tools/py38_check.sh makes one"
    for py in found:
        if subprocess.run([py, "-c", PY38_PROBE], capture_output=True, timeout=120).returncode == 0:
            return py, ""
    return None, (
        f"no python3.8 here has the runtime dependencies (numpy, onnxruntime, cv2, rich); tried "
        f"{', '.join(found)}: run tools/py38_check.sh, or set HEMAEDGE_PY38 to a 3.8 venv's python"
    )


PY38_RUN = textwrap.dedent("""
    import importlib, importlib.util, os, pkgutil, sys
    assert sys.version_info[:2] == (3, 8), sys.version

    class ThisCheckout:
        # Import hemaedge.* from this checkout, however the 3.8 venv installed it (the folders edge/, evaluation/...
        # install under hemaedge.* by pyproject's package-dir: a PYTHONPATH alone cannot express that mapping).
        ROOT = sys.argv[2]
        MAP = {"hemaedge": "hemaedge", "hemaedge.edge": "edge", "hemaedge.evaluation": "evaluation",
               "hemaedge.calibration": "calibration", "hemaedge.export": "export"}

        def find_spec(self, name, path=None, target=None):
            if name not in self.MAP:
                return None
            folder = os.path.join(self.ROOT, self.MAP[name])
            return importlib.util.spec_from_file_location(
                name, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])

    sys.meta_path.insert(0, ThisCheckout())
    import hemaedge
    import hemaedge.edge
    import hemaedge.evaluation
    names = []
    for pkg in (hemaedge, hemaedge.edge, hemaedge.evaluation):
        for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if not m.name.endswith(".__main__"):  # runs the CLI
                importlib.import_module(m.name)
                names.append(m.name)
    import numpy as np
    from hemaedge.edge.bundle import load_bundle
    from hemaedge.edge.classify.select import select_backend
    bundle = load_bundle(sys.argv[1])
    backend, reason = select_backend(bundle, "onnxruntime", "auto")
    with backend:
        probs = backend.classify(np.random.default_rng(0).normal(0, 1, (3, 3, 28, 28)).astype(np.float32))
    assert probs.shape == (3, 8), probs.shape
    print(len(names), "modules;", reason)
""")


def test_runtime_runs_under_python38(tmp_path, tiny_bundle_dir):
    """Import every runtime module and classify a batch under a real CPython 3.8."""
    py, why = _python38()
    if py is None:
        pytest.skip(why)
    out = subprocess.run(
        [py, "-c", PY38_RUN, str(tiny_bundle_dir), str(ROOT)], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
