"""One writer per data layout: the raw field names of what eventcore stores are spelled only in
eventcore._layout (and read/written only by eventcore._codec), and each layout constant is
defined once."""

from __future__ import annotations

import ast
from pathlib import Path

from eventcore import _layout as L

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("eventcore", "workers", "subscribers", "sinks")
OWNERS = {"eventcore/_codec.py", "eventcore/_layout.py"}
# the stored field names (stream entries, feed, dispatch, meta, view, dead letters)
FIELD_PREFIXES = ("ENTRY_", "FEED_", "DISPATCH_", "META_", "VIEW_", "DEAD_")
FIELDS = {v for k, v in L.constants().items()
          if k.startswith(FIELD_PREFIXES) and not k.startswith("DEAD_KIND_")}
_HASH_CALLS = {"hget", "hmget", "hset", "hdel", "hincrby", "xadd"}


def _modules() -> list[tuple[str, ast.Module]]:
    out = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            # eventcore/workers etc. are symlinks to the top-level folders: walk those once
            if any(rel.startswith(f"eventcore/{p}/") for p in PACKAGES[1:]):
                continue
            out.append((rel, ast.parse(path.read_text(), rel)))
    return out


MODULES = _modules()


def _raw_field_uses(tree: ast.Module) -> list[str]:
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, bytes):
            if node.value.decode(errors="replace") in FIELDS:
                hits.append(f"line {node.lineno}: {node.value!r}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in _HASH_CALLS):
            for arg in ast.walk(ast.Tuple(elts=list(node.args), ctx=ast.Load())):
                if isinstance(arg, ast.Constant) and arg.value in FIELDS:
                    hits.append(f"line {arg.lineno}: {node.func.attr}(... {arg.value!r})")
    return hits


def test_the_walk_sees_the_packages() -> None:
    names = {rel for rel, _ in MODULES}
    assert {"eventcore/_codec.py", "workers/_worker.py", "subscribers/_runtime.py",
            "eventcore/server/_hub.py"} <= names


def test_only_the_codec_spells_raw_fields() -> None:
    found = {rel: hits for rel, tree in MODULES if rel not in OWNERS
             if (hits := _raw_field_uses(tree))}
    assert found == {}


def test_the_check_catches_a_raw_field() -> None:
    tree = ast.parse('x = fields.get(b"sid")\nredis.hget(key, "dispatched")\n')
    assert len(_raw_field_uses(tree)) == 2


def _module_constants(tree: ast.Module) -> dict[str, str]:
    out = {}
    for node in tree.body:
        target, value = None, None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign):
            target, value = node.target, node.value
        if (isinstance(target, ast.Name) and isinstance(value, ast.Constant)
                and isinstance(value.value, str)):
            out[target.id] = value.value
    return out


def test_layout_constants_are_defined_once() -> None:
    layout = L.constants()
    owned = set(L.EVENT_TYPES) | {v for v in FIELDS if len(v) > 3}
    elsewhere = {
        f"{rel}:{name}": value
        for rel, tree in MODULES if rel != "eventcore/_layout.py"
        for name, value in _module_constants(tree).items() if value in owned
    }
    assert elsewhere == {}
    # and within the layout, no two field names of one record collide
    for prefix in ("ENTRY_", "META_", "VIEW_"):
        values = [v for k, v in layout.items() if k.startswith(prefix)]
        assert len(values) == len(set(values)), prefix
    entry = {v for k, v in layout.items() if k.startswith("ENTRY_")}
    assert not entry & {L.FEED_SESSION, L.FEED_SEQ}
