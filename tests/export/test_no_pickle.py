"""Nothing in imagerec unpickles: only data/idx.py's restricted unpickler imports pickle, and torch.load
is never called without weights_only=True."""

from __future__ import annotations

import ast
from pathlib import Path

import imagerec

PACKAGE = Path(imagerec.__file__).parent
ALLOWED_PICKLE = {"data/idx.py"}  # CIFAR batches: an Unpickler that only rebuilds numpy arrays


def _modules() -> list[tuple[str, ast.Module]]:
    return [(p.relative_to(PACKAGE).as_posix(), ast.parse(p.read_text(), str(p))) for p in sorted(PACKAGE.rglob("*.py"))]


def test_only_the_restricted_unpickler_imports_pickle() -> None:
    offenders = []
    for rel, tree in _modules():
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if any(n.split(".")[0] in ("pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib") for n in names):
                offenders.append(rel)
    assert set(offenders) <= ALLOWED_PICKLE, f"pickle imported in {sorted(set(offenders) - ALLOWED_PICKLE)}"
    assert len(_modules()) > 20  # the scan saw the package


def test_torch_load_only_with_weights_only() -> None:
    offenders = []
    for rel, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    offenders.append(f"{rel}:{node.lineno}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("loads", "load") \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "pickle":
                offenders.append(f"{rel}:{node.lineno} pickle.{node.func.attr}")
    assert not offenders, f"unsafe loads: {offenders}"
