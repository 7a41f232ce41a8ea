"""The layers, checked the way import-linter would: every import statement of every module
(module level, inside functions, under ``TYPE_CHECKING``) is read from the source, and none may
reach a higher layer.

    eventcore (the log: core modules, eventcore.testing)
      < eventcore.sinks, eventcore.client          (independent of each other; the client
                                                    imports the core only, never the server)
      < eventcore.workers, eventcore.subscribers   (independent of each other)
      < eventcore.server                           (HTTP API, SSE hub, WebRTC, /ui, CLI, demo, tail)

Nothing imports the repository folders as top-level packages (``workers``, ``subscribers``,
``sinks``): they exist only as ``eventcore.*``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "eventcore"

# the layer of each package; a module may import its own layer and the ones below
LAYER = {
    "eventcore": 0,
    "eventcore.testing": 0,
    "eventcore.sinks": 1,
    "eventcore.client": 1,
    "eventcore.workers": 2,
    "eventcore.subscribers": 2,
    "eventcore.server": 3,
}
# same-layer packages that must stay independent of each other
INDEPENDENT = {frozenset({"eventcore.workers", "eventcore.subscribers"}),
               frozenset({"eventcore.client", "eventcore.sinks"})}
TOP_LEVEL_FOLDERS = {"workers", "subscribers", "sinks"}


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    # rglob does not follow the eventcore/workers -> ../workers links: walk each root
    roots = {"eventcore": ROOT} | {f"eventcore.{name}": ROOT / name for name in TOP_LEVEL_FOLDERS}
    for prefix, root in roots.items():
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if prefix == "eventcore" and parts and parts[0] in TOP_LEVEL_FOLDERS:
                continue
            found[".".join([prefix, *parts])] = path
    return found


def _package_of(module: str) -> str:
    best = "eventcore"
    for pkg in LAYER:
        if (module == pkg or module.startswith(pkg + ".")) and len(pkg) > len(best):
            best = pkg
    return best


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            # ``from eventcore import server`` imports the subpackage too
            out += [(node.lineno, f"{target}.{alias.name}") for alias in node.names
                    if f"{target}.{alias.name}" in LAYER]
    return out


MODULES = _modules()


def test_the_walk_sees_every_package() -> None:
    packages = {_package_of(m) for m in MODULES}
    assert packages == set(LAYER)
    assert "eventcore.workers._worker" in MODULES
    assert "eventcore.server._http._sse" in MODULES


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_reaches_a_higher_layer(module: str) -> None:
    own = _package_of(module)
    bad = []
    for line, target in _imports(module, MODULES[module]):
        head = target.split(".")[0]
        if head in TOP_LEVEL_FOLDERS:
            bad.append(f"line {line}: top-level {target!r} (use eventcore.{target})")
            continue
        if head != "eventcore":
            continue
        other = _package_of(target)
        if LAYER[other] > LAYER[own]:
            bad.append(f"line {line}: {own} (layer {LAYER[own]}) imports {target} "
                       f"(layer {LAYER[other]})")
        elif frozenset({own, other}) in INDEPENDENT:
            bad.append(f"line {line}: {own} imports {target}; they stay independent")
    assert bad == []


def test_the_check_catches_a_violation(tmp_path: Path) -> None:
    # the rule itself can fail: a core module importing the service is reported
    fake = tmp_path / "_fake.py"
    fake.write_text("def f():\n    from eventcore.server import serve\n"
                    "    from .workers import Worker\n")
    targets = [t for _, t in _imports("eventcore._fake", fake)]
    assert "eventcore.server" in targets
    assert "eventcore.workers" in targets
    assert all(LAYER[_package_of(t)] > 0 for t in targets)
