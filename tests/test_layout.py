"""The package layout: one import package (actorfs), imports that point down the
layers only, and no sys.path edits anywhere in the repository."""

from __future__ import annotations

import ast
import glob
import importlib
import os
import re
import tomllib

import pytest

import actorfs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Bottom to top. A package may import itself and anything ranked lower; devfuse
# and vhost (the two transports) share a rank, so neither imports the other.
RANK = {
    "core": 0,
    "host": 1,
    "actors": 2,
    "dax": 3,
    "ops": 4,
    "fuse": 5,
    "devfuse": 6,
    "vhost": 6,
    "cli": 7,
    "actorfs": 8,  # actorfs/__init__.py and __main__.py: the public API on top
}


def _sources() -> list[tuple[str, str]]:
    """(layer, path) of every module of the installed package, from the real files."""
    out = [("actorfs", os.path.join(REPO, "actorfs", f)) for f in ("__init__.py", "__main__.py")]
    for name in sorted(os.listdir(os.path.join(REPO, "actors"))):
        if name.endswith(".py"):
            out.append(("actors", os.path.join(REPO, "actors", name)))
    for pkg in sorted(os.listdir(os.path.join(REPO, "runtime"))):
        d = os.path.join(REPO, "runtime", pkg)
        if os.path.isdir(d) and os.path.exists(os.path.join(d, "__init__.py")):
            for name in sorted(os.listdir(d)):
                if name.endswith(".py"):
                    out.append((pkg, os.path.join(d, name)))
    return out


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[: -len(".py")].split(os.sep)
    if rel[-1] == "__init__":
        rel = rel[:-1]
    return ".".join(rel if rel[0] == "actorfs" else ["actorfs", *rel])


def _imports(path: str) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, at any depth."""
    tree = ast.parse(open(path).read(), path)
    me = _module_name(path)
    package = me if path.endswith("__init__.py") else me.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from actorfs.runtime.ops import ops` imports a module: count each name
            found += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("_load",):
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append((node.lineno, arg.value))
    return found


def _layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "actorfs":
        return None
    if len(parts) == 1:
        return "actorfs"
    if parts[1] == "actors":
        return "actors"
    if parts[1] == "runtime" and len(parts) > 2:
        return parts[2] if parts[2] in RANK else None
    return "actorfs" if parts[1] in ("__main__",) else None


SOURCES = _sources()


def test_every_layer_is_known():
    assert {layer for layer, _ in SOURCES} == set(RANK)


@pytest.mark.parametrize("layer,path", SOURCES, ids=[os.path.relpath(p, REPO) for _, p in SOURCES])
def test_imports_point_down(layer, path):
    bad = []
    for line, module in _imports(path):
        top = module.split(".")[0]
        if top in ("runtime", "actors"):
            bad.append(f"line {line}: {module} (import it as actorfs.{module})")
            continue
        target = _layer_of(module)
        if target is None or target == layer:
            continue
        if RANK[target] >= RANK[layer]:
            bad.append(f"line {line}: {layer} imports {module} ({target} is not below it)")
    assert not bad, "\n".join(bad)


SYS_PATH_EDIT = re.compile(r"sys\.path\s*(\.\s*(insert|append|extend)\b|(\[[^\]]*\])?\s*\+?=)")


def _repo_python_files():
    for d, dirs, files in os.walk(REPO):
        dirs[:] = [x for x in dirs if not x.startswith(".") and x not in ("build", "dist")
                   and not x.endswith(".egg-info") and x != "__pycache__"
                   and not os.path.islink(os.path.join(d, x))]  # fmt: skip
        for f in files:
            if f.endswith(".py"):
                yield os.path.join(d, f)


def test_no_sys_path_edits_anywhere():
    me = os.path.abspath(__file__)
    bad = []
    for path in _repo_python_files():
        if path == me:
            continue
        for n, line in enumerate(open(path, encoding="utf-8"), 1):
            if SYS_PATH_EDIT.search(line):
                bad.append(f"{os.path.relpath(path, REPO)}:{n}: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_public_api_resolves():
    for name in actorfs.__all__:
        assert getattr(actorfs, name) is not None, name
    assert sorted(dir(actorfs)) == sorted(set(dir(actorfs)))


def test_pyproject_lists_every_package():
    """Packages are listed by hand (actors/ and runtime/ are mapped under actorfs):
    a subpackage missing from the list would be missing from a wheel."""
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    want = {"actorfs", "actorfs.actors", "actorfs.runtime"}
    for pkg in os.listdir(os.path.join(REPO, "runtime")):
        if os.path.exists(os.path.join(REPO, "runtime", pkg, "__init__.py")):
            want.add(f"actorfs.runtime.{pkg}")
    assert listed == want
    for name in want:
        importlib.import_module(name)


def test_fuse_abi_values_are_defined_once():
    """The FUSE ABI values core/abi.py holds (root id, setattr and open bits, dirent
    sizes, the largest transfer, the header peek) are assigned nowhere else: other
    modules import them, so two copies can never drift apart."""
    abi_path = os.path.join(REPO, "runtime", "core", "abi.py")
    with open(abi_path) as f:
        tree = ast.parse(f.read())
    defined = {t.id for node in tree.body if isinstance(node, ast.Assign)
               for t in node.targets if isinstance(t, ast.Name) and not t.id.startswith("_")}
    defined |= {node.name for node in tree.body
                if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_")}
    assert {"FUSE_ROOT_ID", "FATTR_KILL_SUIDGID", "dirent_size", "peek_header"} <= defined
    copies = []
    for _layer, path in _sources():
        if os.path.samefile(path, abi_path):
            continue
        with open(path) as f:
            body = ast.parse(f.read()).body
        for node in body:
            names = []
            if isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.FunctionDef | ast.ClassDef):
                names = [node.name]
            where = os.path.relpath(path, REPO)
            copies += [f"{where}:{node.lineno} {n}" for n in names if n in defined]
    assert not copies, "FUSE ABI values defined outside runtime/core/abi.py:\n" + "\n".join(copies)


# Paths the documentation names that are not ours: QEMU's own documentation.
EXTERNAL_PATHS = {"docs/interop/vhost-user.rst"}
_TOPS = ("runtime", "actors", "actorfs", "tests", "docs", "bench", "scripts", "fuzz", "share", ".ci")
_DOC_PATH = re.compile(r"(?<![\w./-])((?:" + "|".join(map(re.escape, _TOPS)) + r")/[\w./*-]*)")
_DOC_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
_DOC_MODULE = re.compile(r"(?<![\w.-])actorfs(?:\.\w+)+")


def _module_exists(dotted: str) -> bool:
    """actorfs.runtime.ops.ops, or a name in one (actorfs.mount, ...protocol.FUSE_LOOKUP)."""
    parts = dotted.split(".")
    if parts[-1] in ("json", "py", "md"):  # a file name such as 50-actorfs.json
        return True
    for k in range(len(parts), 0, -1):
        rel = parts[1:k]
        if rel and rel[0] in ("runtime", "actors"):
            where = os.path.join(REPO, *rel)
        else:
            where = os.path.join(REPO, "actorfs", *rel)
        if os.path.exists(where + ".py") or os.path.exists(os.path.join(where, "__init__.py")):
            if k == len(parts):
                return True
            return hasattr(importlib.import_module(".".join(parts[:k])), parts[k])
    return False


def test_docs_name_real_paths():
    """Every repository path, relative link and actorfs module that README.md and
    docs/*.md name exists, and no link leaves the repository: the docs are read
    beside the code, and a renamed file must not leave them pointing nowhere."""
    docs = ["README.md"] + sorted(
        os.path.join("docs", f) for f in os.listdir(os.path.join(REPO, "docs")) if f.endswith(".md")
    )
    bad = []
    for doc in docs:
        base = os.path.dirname(os.path.join(REPO, doc))
        with open(os.path.join(REPO, doc), encoding="utf-8") as f:
            lines = list(f)
        for n, line in enumerate(lines, 1):
            for m in _DOC_PATH.finditer(line):
                path = m.group(1).rstrip(".,:;")
                if path not in EXTERNAL_PATHS and not glob.glob(os.path.join(REPO, path)):
                    bad.append(f"{doc}:{n}: {path}")
            for m in _DOC_LINK.finditer(line):
                target = m.group(1)
                if "://" in target or target.startswith("mailto:"):
                    continue
                full = os.path.normpath(os.path.join(base, target))
                if os.path.relpath(full, REPO).startswith(".."):
                    bad.append(f"{doc}:{n}: link {target} leaves the repository")
                elif not os.path.exists(full):
                    bad.append(f"{doc}:{n}: link {target}")
            for m in _DOC_MODULE.finditer(line):
                if not _module_exists(m.group(0)):
                    bad.append(f"{doc}:{n}: module {m.group(0)}")
    assert not bad, "\n".join(bad)
