"""The rules of the house that the import graph can hold, checked over the source's AST.

* The layers (docs/architecture.md): a module imports only from its own layer or the layers
  below. So the protocol cores stay pure, the node's state knows nothing of services, the
  services nothing of the daemon, and the daemon nothing of marsadm.
* The faces (``status/``, ``exporters/``) import of the engine only its public model package,
  ``mars.engine.model``: a face that reached into the engine could compute a verdict of its own.
* The protocol cores import no I/O: no asyncio, socket, os (the h11 design: bytes in, events
  out, so every edge case is a unit test and a fuzz target).
* Every package folder is in pyproject's package list, so the wheel has it (a missing one
  crashes the installed commands on import; tests/test_wheel.py proves the whole install).
* The model package, findings included, type-checks under ``mypy --strict``: the rules read
  typed fields, and a misspelt one is an error here, not a rule that silently never fires.

Every import counts, also one inside a function: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOPS = {"mars": "mars", "engine": "mars.engine", "status": "mars.status", "exporters": "mars.exporters"}

# Bottom to top. A module may import from its own layer and the ones below; a package name
# stands for every module under it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("mars", "mars.engine", "mars.engine.errors", "mars.engine.sansio", "mars.engine.entry",
              "mars.engine.extents", "mars.engine.log.values", "mars.engine.log.format", "mars.engine.nbd.protocol",
              "mars.engine.peer.protocol", "mars.engine.log", "mars.engine.nbd", "mars.engine.peer",
              "mars.engine.roles", "mars.engine.daemon")),
    ("node", ("mars.engine.tree", "mars.engine.trigger", "mars.engine.device", "mars.engine.credentials",
              "mars.engine.nbd.psk", "mars.engine.log.files", "mars.engine.log.apply")),
    ("services", ("mars.engine.log.writer", "mars.engine.log.recovery", "mars.engine.log.replayer",
                  "mars.engine.nbd.server", "mars.engine.peer.link", "mars.engine.roles.")),
    ("model", ("mars.engine.model",)),
    ("daemon", ("mars.engine.peer.services", "mars.engine.daemon.")),
    ("tools", ("mars.engine.marsadm",)),
    ("faces", ("mars.status", "mars.exporters")),
]
CORES = ("mars.engine.sansio", "mars.engine.entry", "mars.engine.extents", "mars.engine.log.values",
         "mars.engine.log.format",
         "mars.engine.nbd.protocol", "mars.engine.peer.protocol")
NO_IO = {"asyncio", "socket", "os", "ssl", "selectors", "threading", "subprocess", "select", "io", "pathlib"}
FACES = ("mars.status", "mars.exporters")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [TOPS[rel.parts[0]], *rel.parts[1:]]
    name = ".".join(parts)
    return name.removesuffix(".__init__")


def source_files() -> list[Path]:
    return sorted(p for top in TOPS for p in (ROOT / top).rglob("*.py"))


def bound_names(init: Path) -> set[str]:
    """The names a package's __init__ binds itself (what ``from pkg import name`` then gets)."""
    out: set[str] = set()
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.Assign):
            out |= {n.id for tgt in node.targets for n in ast.walk(tgt) if isinstance(n, ast.Name)}
    return out


def _init_of(pkg: str) -> Path | None:
    for folder, top in sorted(TOPS.items(), key=lambda kv: -len(kv[1])):
        if pkg == top or pkg.startswith(top + "."):
            init = ROOT / folder / Path(*pkg[len(top) + 1:].split(".")) / "__init__.py" if pkg != top \
                else ROOT / folder / "__init__.py"
            return init if init.exists() else None
    return None


def imports(path: Path, text: str) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file; ``from pkg import name`` also
    yields ``pkg.name`` where that name is a submodule, not something pkg's __init__ binds."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            init = _init_of(target)
            bound = bound_names(init) if init is not None else set()
            out += [(node.lineno, f"{target}.{a.name}") for a in node.names if a.name != "*" and a.name not in bound]
    return out


def mars_modules() -> set[str]:
    return {module_name(p) for p in source_files()}


def real_module(name: str, known: set[str]) -> str | None:
    """The project module an import names (``pkg.Class`` -> ``pkg``); None for other packages."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def layer_of(mod: str) -> int:
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p if p.endswith(".") else p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    if best is None:
        raise AssertionError(f"{mod} is in no layer: add it to LAYERS in tests/test_layers.py and to "
                             f"docs/architecture.md")
    return best


def violations(extra: dict[Path, str] | None = None) -> list[str]:
    """Every broken rule, one line each; ``extra`` adds files (path: source) as if they existed."""
    files = {p: p.read_text() for p in source_files()} | (extra or {})
    known = mars_modules() | {module_name(p) for p in files}
    out = []
    for path, text in sorted(files.items()):
        mod = module_name(path)
        where = f"{path.relative_to(ROOT)}"
        mine = layer_of(mod)
        for line, target in imports(path, text):
            top = target.split(".")[0]
            if mod.startswith(CORES) and top in NO_IO:
                out.append(f"{where}:{line}: protocol core {mod} imports {target} (cores do no I/O)")
            dep = real_module(target, known) if top == "mars" else None
            if dep is None or dep == mod:
                continue
            if mod.startswith(FACES) and dep.startswith("mars.engine") and not (
                    dep == "mars.engine" or dep == "mars.engine.model"):
                out.append(f"{where}:{line}: face {mod} imports {dep}; faces import only mars.engine.model")
            theirs = layer_of(dep)
            if theirs > mine:
                out.append(f"{where}:{line}: {mod} ({LAYERS[mine][0]}) imports {dep} ({LAYERS[theirs][0]}), "
                           f"a layer above it")
            if mod.startswith(CORES) and not dep.startswith(CORES) and dep not in ("mars.engine.errors",):
                out.append(f"{where}:{line}: protocol core {mod} imports {dep}, which is not pure")
    return list(dict.fromkeys(out))


def test_every_module_has_a_layer():
    for mod in sorted(mars_modules()):
        layer_of(mod)


def test_the_import_graph_keeps_the_layers():
    assert violations() == []


@pytest.mark.parametrize("path, source, said", [
    ("status/probe.py", "from ..engine.tree import Tree\n", "face mars.status.probe imports mars.engine.tree"),
    ("status/probe.py", "def f():\n    from ..engine.model import snapshot\n",
     "face mars.status.probe imports mars.engine.model.snapshot"),
    ("engine/nbd/protocol.py", "import asyncio\n", "protocol core mars.engine.nbd.protocol imports asyncio"),
    ("engine/daemon/marsd.py", "from ..marsadm.base import Ctx\n", "(daemon) imports mars.engine.marsadm.base (tools)"),
    ("engine/log/writer.py", "from ...status import render\n", "(services) imports mars.status.render (faces)"),
])
def test_the_rules_catch_a_violation(path, source, said):
    """The check itself can fail: each kind of violation, planted in a file, is reported."""
    found = violations({ROOT / path: source})
    assert any(said in v for v in found), found


def test_every_package_folder_is_in_the_wheel():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(meta["packages"])
    folders = {module_name(p) for p in source_files() if p.name == "__init__.py"}
    assert folders - listed == set(), "add these packages to pyproject.toml [tool.setuptools] packages"
    assert listed - folders == set(), "pyproject.toml lists packages that have no folder"
    for pkg, patterns in meta.get("package-data", {}).items():
        folder = ROOT / meta["package-dir"].get(pkg, pkg.replace(".", "/"))
        for pattern in patterns:
            assert list(folder.glob(pattern)), f"package data {pkg}:{pattern} matches no file"


def test_the_model_type_checks(tmp_path):
    """mypy --strict over the model package (findings, snapshot, states, units, client)."""
    if shutil.which("mypy", path=str(Path(sys.executable).parent)) is None:
        pytest.fail("mypy is not installed in the test venv; 'make test' installs it (pyproject [test])")
    # mypy follows import names to folders; the repository maps mars.engine onto engine/, so give
    # it the installed layout as links.
    pkg = tmp_path / "mars"
    pkg.mkdir()
    shutil.copy(ROOT / "mars" / "__init__.py", pkg / "__init__.py")
    for top in ("engine", "status", "exporters"):
        os.symlink(ROOT / top, pkg / top)
    r = subprocess.run([str(Path(sys.executable).parent / "mypy"), "--strict", "--follow-imports=silent",
                        "--cache-dir", str(tmp_path / "cache"), "-p", "mars.engine.model"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
