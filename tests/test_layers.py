"""The direction of imports (STYLE: "Direction of imports"), read from the source with ``ast``.

- The core (``crdtsync`` except ``cli``, ``__main__`` and ``testing``) imports nothing of
  ours from the layers above it, and no I/O framework (``websockets``, ``asyncio``...).
- ``crdtsync.client`` and ``crdtsync.server`` never import each other.
- ``cli``, ``__main__`` and ``testing`` are composition roots: they may import everything,
  and nothing imports them.
- Nothing imports bare top-level ``client`` or ``server`` modules.

Files are found through ``importlib.util.find_spec``, so the folder mapping of pyproject
(``client/`` is ``crdtsync.client``) is the one checked, not what sits in the repo root.
The checker is also run on planted source strings, to show it fails where it should.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGES = ("crdtsync", "crdtsync.client", "crdtsync.server")
COMPOSITION_ROOTS = ("crdtsync.cli", "crdtsync.__main__", "crdtsync.testing")
IO_MODULES = ("websockets", "asyncio", "anyio", "socket", "selectors", "ssl", "redis")


@dataclass(frozen=True)
class Rule:
    forbidden: tuple[str, ...]
    reason: str


CORE_RULE = Rule(
    ("crdtsync.client", "crdtsync.server", *COMPOSITION_ROOTS, *IO_MODULES),
    "the core is pure: no layer above it, no I/O framework",
)
CLIENT_RULE = Rule(
    ("crdtsync.server", *COMPOSITION_ROOTS), "client and server never import each other"
)
SERVER_RULE = Rule(
    ("crdtsync.client", *COMPOSITION_ROOTS), "client and server never import each other"
)
EVERYWHERE_RULE = Rule(("client", "server"), "bare top-level client/server modules do not exist")


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def rules_for(module: str) -> list[Rule]:
    if any(within(module, root) for root in COMPOSITION_ROOTS):
        return [EVERYWHERE_RULE]
    if within(module, "crdtsync.client"):
        return [CLIENT_RULE, EVERYWHERE_RULE]
    if within(module, "crdtsync.server"):
        return [SERVER_RULE, EVERYWHERE_RULE]
    return [CORE_RULE, EVERYWHERE_RULE]


def imported_names(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """Yield ``(line, absolute module name)`` for every import in ``tree``, nested ones too.

    ``from a import b`` yields both ``a`` and ``a.b`` (``b`` may be a submodule), relative
    imports are resolved against ``module``, and ``importlib.import_module("x")`` /
    ``__import__("x")`` with a literal name count as imports of ``x``.
    """
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                if node.level - 1 >= len(parts):
                    raise ValueError(f"{module}:{node.lineno}: relative import beyond the top")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                if node.module:
                    base = f"{base}.{node.module}"
            else:
                base = node.module or ""
            yield node.lineno, base
            for alias in node.names:
                if alias.name != "*":
                    yield node.lineno, f"{base}.{alias.name}"
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
        ):
            yield node.lineno, node.args[0].value


def check_source(source: str, module: str, is_package: bool, path: str) -> list[str]:
    """Every forbidden import in ``source`` as ``"path:line: module imports x: reason"``."""
    tree = ast.parse(source, filename=path)
    problems: list[str] = []
    seen: set[tuple[int, str]] = set()
    for line, name in imported_names(tree, module, is_package):
        for rule in rules_for(module):
            for prefix in rule.forbidden:
                if within(name, prefix) and (line, prefix) not in seen:
                    seen.add((line, prefix))
                    problems.append(f"{path}:{line}: {module} imports {name}: {rule.reason}")
    return problems


@dataclass(frozen=True)
class SourceFile:
    path: Path
    module: str
    is_package: bool


def source_files() -> list[SourceFile]:
    """Every .py file of our three packages, named as installed (via find_spec)."""
    files: list[SourceFile] = []
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        assert spec is not None, f"{package} is not importable"
        assert spec.submodule_search_locations, f"{package} is not a package"
        (root,) = spec.submodule_search_locations
        root_path = Path(root)
        for path in sorted(root_path.rglob("*.py")):
            relative = path.relative_to(root_path).with_suffix("").parts
            if "__pycache__" in relative:
                continue
            if package == "crdtsync" and relative[0] in ("client", "server"):
                continue  # not part of crdtsync's own folder (never there, but be sure)
            is_package = relative[-1] == "__init__"
            parts = relative[:-1] if is_package else relative
            files.append(SourceFile(path, ".".join((package, *parts)), is_package))
    return files


# -- the real code base --------------------------------------------------------------------------


def test_packages_are_found_where_pyproject_maps_them() -> None:
    modules = {f.module: f.path for f in source_files()}
    # premise: the check really covers all three layers, through the installed mapping
    for expected in (
        "crdtsync",
        "crdtsync.protocol",
        "crdtsync.sync",
        "crdtsync.store",
        "crdtsync.settings",
        "crdtsync.cli",
        "crdtsync.testing",
        "crdtsync.client",
        "crdtsync.client.replica",
        "crdtsync.server",
        "crdtsync.server.relay",
    ):
        assert expected in modules, expected
    assert modules["crdtsync.client.replica"].parent.name == "client"
    assert modules["crdtsync.server.relay"].parent.name == "server"


def test_no_module_imports_across_layers() -> None:
    problems: list[str] = []
    imports_checked = 0
    for file in source_files():
        source = file.path.read_text(encoding="utf-8")
        imports_checked += sum(
            1 for _ in imported_names(ast.parse(source), file.module, file.is_package)
        )
        problems += check_source(source, file.module, file.is_package, str(file.path))
    assert imports_checked > 50  # premise: the walk saw the real imports
    assert problems == []


# -- the checker itself, on planted sources ------------------------------------------------


def test_core_importing_the_server_is_reported_with_file_and_line() -> None:
    source = "import json\n\nfrom crdtsync.server import Relay\n"
    assert check_source(source, "crdtsync.store", False, "crdtsync/store.py") == [
        "crdtsync/store.py:3: crdtsync.store imports crdtsync.server: "
        "the core is pure: no layer above it, no I/O framework"
    ]


def test_core_importing_websockets_is_reported() -> None:
    source = "from websockets.asyncio.client import connect\n"
    assert check_source(source, "crdtsync.sync", False, "crdtsync/sync.py") == [
        "crdtsync/sync.py:1: crdtsync.sync imports websockets.asyncio.client: "
        "the core is pure: no layer above it, no I/O framework"
    ]


def test_core_importing_asyncio_inside_a_function_is_reported() -> None:
    source = "def later():\n    import asyncio\n    return asyncio\n"
    assert check_source(source, "crdtsync.protocol", False, "p.py") == [
        "p.py:2: crdtsync.protocol imports asyncio: "
        "the core is pure: no layer above it, no I/O framework"
    ]


def test_core_package_init_importing_the_client_relatively_is_reported() -> None:
    source = "from . import client\n"
    assert check_source(source, "crdtsync", True, "crdtsync/__init__.py") == [
        "crdtsync/__init__.py:1: crdtsync imports crdtsync.client: "
        "the core is pure: no layer above it, no I/O framework"
    ]


def test_client_importing_the_server_relatively_is_reported() -> None:
    source = "from ..server.relay import Relay\n"
    assert check_source(source, "crdtsync.client.replica", False, "client/replica.py") == [
        "client/replica.py:1: crdtsync.client.replica imports crdtsync.server.relay: "
        "client and server never import each other"
    ]


def test_server_importing_the_client_by_name_is_reported() -> None:
    source = "from crdtsync import client\n"
    assert check_source(source, "crdtsync.server.relay", False, "server/relay.py") == [
        "server/relay.py:1: crdtsync.server.relay imports crdtsync.client: "
        "client and server never import each other"
    ]


def test_dynamic_import_of_the_client_from_the_core_is_reported() -> None:
    source = 'import importlib\nmod = importlib.import_module("crdtsync.client")\n'
    assert check_source(source, "crdtsync.store", False, "s.py") == [
        "s.py:2: crdtsync.store imports crdtsync.client: "
        "the core is pure: no layer above it, no I/O framework"
    ]


def test_importing_the_harness_from_the_server_is_reported() -> None:
    source = "from crdtsync.testing import Harness\n"
    assert check_source(source, "crdtsync.server.relay", False, "r.py") == [
        "r.py:1: crdtsync.server.relay imports crdtsync.testing: "
        "client and server never import each other"
    ]


def test_bare_top_level_server_import_is_reported() -> None:
    source = "import server.relay\n"
    assert check_source(source, "crdtsync.cli", False, "crdtsync/cli.py") == [
        "crdtsync/cli.py:1: crdtsync.cli imports server.relay: "
        "bare top-level client/server modules do not exist"
    ]


@pytest.mark.parametrize(
    ("source", "module", "is_package"),
    [
        ("from crdtsync.server import Relay\nimport asyncio\n", "crdtsync.cli", False),
        ("from .cli import main\n", "crdtsync.__main__", False),
        ("from crdtsync.client import Replica\n", "crdtsync.testing", True),
        (
            "from crdtsync.protocol import SyncStep1\nimport asyncio\n",
            "crdtsync.client.replica",
            False,
        ),
        ("from .relay import Relay\n", "crdtsync.server", True),
        ("from .errors import CloseCode\nimport sqlite3, threading\n", "crdtsync.store", False),
        ("from .backoff import Backoff\n", "crdtsync.client", True),
    ],
)
def test_allowed_imports_are_not_reported(source: str, module: str, is_package: bool) -> None:
    assert check_source(source, module, is_package, "f.py") == []


def test_relative_import_resolves_against_the_module_package() -> None:
    tree = ast.parse("from . import x\nfrom .. import y\nfrom ..a.b import c\n")
    assert list(imported_names(tree, "crdtsync.client.replica", False)) == [
        (1, "crdtsync.client"),
        (1, "crdtsync.client.x"),
        (2, "crdtsync"),
        (2, "crdtsync.y"),
        (3, "crdtsync.a.b"),
        (3, "crdtsync.a.b.c"),
    ]
