"""The shape docs/design.md promises, checked on the source itself: modules of a readable
size, no import cycles (lazy imports inside functions count too: they only hide a cycle),
and no module reaching into another object's private members."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "nbdbackup"
MAX_LINES = 400

# Private names of the standard library, each used on purpose.
ALLOWED_PRIVATE = {
    "os._exit",                 # the CLI and a forked child skip interpreter teardown
    "self.reader._buffer",      # asyncio has no public way to see what STARTTLS left behind,
                                # or whether the next request is already buffered (server_conn)
    # botocore has no public way to choose its connection classes (TCP_QUICKACK, 1 MiB sends:
    # repo/s3client.py); without these attributes requests work as before, only slower
    "client._endpoint", "session._manager", "session._pool_classes_by_scheme",
    # DirectGets (repo/s3client.py) sends GETs through botocore's own urllib3 pool, and reads a
    # body into a caller's buffer with http.client's readinto; without them it turns itself off
    "http_session._manager", "http_session._proxy_config", "resp._fp",
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, tree: ast.AST, modules: dict[str, Path]) -> set[str]:
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            candidates = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for c in candidates:
            while c not in modules and "." in c:
                c = c.rsplit(".", 1)[0]
            if c in modules and c != name:
                found.add(c)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, ast.parse(path.read_text()), modules) for name, path in modules.items()}
    assert _cycles(graph) == []


def test_no_module_reaches_into_private_members():
    reaching = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                    continue
                what = ast.unparse(node)
            elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
                names = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if not names:
                    continue
                what = f"from {'.' * node.level}{node.module or ''} import {', '.join(names)}"
            else:
                continue
            if what not in ALLOWED_PRIVATE:
                reaching.append(f"{path.relative_to(ROOT)}:{node.lineno}: {what}")
    assert not reaching, "\n".join(reaching)


def test_every_package_is_installed():
    """pyproject.toml lists the packages by hand: a new one left out works in an editable
    install and is missing from a real one (ModuleNotFoundError in CI, and for users)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
