"""The shape of the code (docs/architecture.md): packages by layer, roles composed not mixed,
small modules, classes and Protocols, no import cycle, aiohttp's internals in one module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "chunkserver"
# The one module allowed to touch another object's `_` names: aiohttp's internals.
FENCE = PACKAGE / "http" / "aiohttpfence.py"
MAX_MODULE_LINES = 450
MAX_CLASS_LINES = 300
MAX_PROTOCOL_MEMBERS = 12
MAX_TOP_MODULES = 12

pytestmark = pytest.mark.local_only


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_the_top_of_the_package_is_what_every_layer_shares() -> None:
    top = [p.name for p in PACKAGE.glob("*.py")]
    assert len(top) <= MAX_TOP_MODULES, sorted(top)
    layers = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert layers == {"auth", "client", "http", "service", "storage"}


def test_modules_and_classes_stay_small() -> None:
    too_big = []
    for path in modules():
        source = path.read_text()
        if len(source.splitlines()) > MAX_MODULE_LINES:
            too_big.append(f"{path.name}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    too_big.append(f"{path.name}: class {node.name}, {size} lines")
                if _is_protocol(node):
                    members = [
                        n
                        for n in node.body
                        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.AnnAssign)
                    ]
                    if len(members) > MAX_PROTOCOL_MEMBERS:
                        too_big.append(f"{path.name}: Protocol {node.name}, {len(members)}")
    assert too_big == []


def test_no_code_reaches_another_objects_private_names() -> None:
    """Only `self._x` and `cls._x`: no `other._x`, no `import _x`, outside the fence."""
    reached = []
    private_use = re.compile(r"([\w.)\]]+)\.(_[a-z]\w*)")
    for path in modules():
        if path == FENCE:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if '"' in code or "'" in code:
                code = re.sub(r"(\"[^\"]*\"|'[^']*')", "", code)
            for owner, name in private_use.findall(code):
                if owner not in ("self", "cls") and f"{owner}.{name}" != "os._exit":
                    reached.append(f"{path.relative_to(PACKAGE)}:{number}: {owner}.{name}")
            if re.search(r"\bimport\s+_[a-z]|\bimport\s.*\b_[a-z]\w*\b", code):
                reached.append(f"{path.relative_to(PACKAGE)}:{number}: {code.strip()}")
    assert reached == []


def test_store_and_service_classes_derive_from_no_role() -> None:
    """Roles are parts, built with the roles they call, not mixins sharing one `self`."""
    derived = []
    for layer in ("storage", "service"):
        for path in (PACKAGE / layer).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and not _is_protocol(node):
                    bases = [ast.unparse(b) for b in node.bases]
                    if any(not _allowed_base(b) for b in bases):
                        derived.append(f"{path.relative_to(PACKAGE)}: {node.name}{bases}")
    assert derived == []


def test_no_import_cycle() -> None:
    graph = {module_name(path): _imports(path) for path in modules()}
    cycles = []
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for target in graph.get(name, ()):
            if state.get(target) == 1:
                cycles.append([*trail[trail.index(target) :], target])
            elif target in graph and target not in state:
                visit(target, [*trail, target])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])
    assert cycles == []


def _is_protocol(node: ast.ClassDef) -> bool:
    return any(ast.unparse(b).split("[")[0] in ("Protocol", "typing.Protocol") for b in node.bases)


def _allowed_base(base: str) -> bool:
    """Exceptions, data shapes and the standard library's: not a role."""
    return base.endswith(("Error", "Exception", "Gone")) or base in (
        "NamedTuple",
        "StrEnum",
        "asyncpg.Connection",
    )


def _imports(path: Path) -> set[str]:
    """The package's modules `path` imports at its top level (what runs at import)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("chunkserver"):
                for alias in node.names:  # `from . import recordlog` imports a module
                    candidate = f"{target}.{alias.name}"
                    found.add(candidate if _exists(candidate) else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("chunkserver"))
    found.discard(name)
    return {f for f in found if _exists(f)}


def _exists(name: str) -> bool:
    relative = Path(*name.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").exists() or (
        PACKAGE / relative / "__init__.py"
    ).exists()
