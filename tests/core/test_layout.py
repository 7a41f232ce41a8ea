"""One writer per data layout: the raw field names of what eventcore stores are spelled only in
eventcore._layout (and read/written only by eventcore._codec), and each layout constant is
defined once."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from eventcore import ErrorInfo, EventLog
from eventcore import _layout as L
from eventcore._codec import decode_dead_letter, subscriber_dead_letter
from eventcore._scripts import lua, lua_layout

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


LUA_DIRS = ("eventcore/_lua", "workers/_lua", "subscribers/_lua")


def test_only_the_prelude_adds_stream_entries() -> None:
    """Session entries, feed entries, dispatch entries and worker dead letters are written by
    the prelude's functions only (group_reclaim.lua moves a feed entry to the dead letters
    through the prelude's ec_dead_entry)."""
    writers = sorted(
        path.relative_to(ROOT).as_posix()
        for d in LUA_DIRS for path in (ROOT / d).glob("*.lua") if "'XADD'" in path.read_text()
    )
    assert writers == ["eventcore/_lua/prelude.lua"]


async def test_the_lua_side_has_the_same_layout(event_log: EventLog) -> None:
    got = await event_log.redis.eval(lua_layout() + "return cjson.encode(L)", 0)
    assert json.loads(got) == L.constants()
    # every script that writes entries or state loads with the prelude in front, and parses
    for package, name in [("eventcore", "append"), ("eventcore", "delete"),
                          ("eventcore.workers", "claim"), ("eventcore.workers", "release"),
                          ("eventcore.workers", "delayed"), ("eventcore.workers", "requeue")]:
        src = lua(package, name, with_prelude=True)
        assert src.startswith(lua_layout()) and src.endswith(lua(package, name))
        sha = await event_log.redis.script_load(src)
        assert await event_log.redis.script_exists(sha) == [True]
    # the scripts that only read fields get the table alone
    for package, name in [("eventcore", "effect_claim"), ("eventcore.workers", "heartbeat"),
                          ("eventcore.subscribers", "view_cas"),
                          ("eventcore.subscribers", "trim_session")]:
        src = lua(package, name, with_layout=True)
        assert src == lua_layout() + lua(package, name)
        assert await event_log.redis.script_exists(await event_log.redis.script_load(src)) == [
            True]


def test_dead_letter_records_of_both_kinds_and_older_shapes() -> None:
    err = b'{"type":"Boom","message":"no","retryable":false}'
    session = {b"sid": b"s-1", b"agent": b"a", b"attempts": b"3", b"error": err,
               b"worker": b"w-1", b"at": b"1700000000000", b"entry": b"5-0"}
    new = decode_dead_letter(b"1-0", {b"kind": b"session", **session})
    old = decode_dead_letter(b"1-0", session)  # written before records carried a kind
    assert new == old
    assert new is not None and new.kind == L.DEAD_KIND_SESSION
    assert (new.session_id, new.agent, new.attempts, new.worker, new.at_ms, new.entry) == (
        "s-1", "a", 3, "w-1", 1700000000000, "5-0")
    assert new.error.type == "Boom" and new.error.retryable is False
    sub = {b"group": b"audit", b"consumer": b"c-1", b"feed": b"ec:{0}:feed", b"entry": b"9-1",
           b"deliveries": b"4", b"error": err, b"f.sid": b"s-2", b"f.seq": b"7"}
    for fields in ({b"kind": b"subscriber", **sub}, sub):
        rec = decode_dead_letter("2-0", fields)
        assert rec is not None and rec.kind == L.DEAD_KIND_SUBSCRIBER
        assert (rec.group, rec.worker, rec.feed, rec.entry, rec.attempts) == (
            "audit", "c-1", "ec:{0}:feed", "9-1", 4)
        assert rec.fields == {b"sid": b"s-2", b"seq": b"7"}
    written = subscriber_dead_letter(
        group="audit", consumer="c-1", feed="ec:{0}:feed", entry_id="9-1", deliveries=4,
        error=ErrorInfo(type="Boom", message="no", retryable=False),
        fields={b"sid": b"s-2", b"seq": b"7"})
    as_stored = {(k if isinstance(k, bytes) else k.encode()): v if isinstance(v, bytes)
                 else v.encode() for k, v in written.items()}
    assert decode_dead_letter("2-0", as_stored) == decode_dead_letter("2-0", {
        b"kind": b"subscriber", **sub})
    # not ours: no error, or a kind nobody writes
    assert decode_dead_letter("3-0", {b"sid": b"s-1"}) is None
    assert decode_dead_letter("3-0", {b"kind": b"other", b"error": err}) is None
    # an unparseable error is kept as text
    rec = decode_dead_letter("4-0", {**session, b"error": b"kaput"})
    assert rec is not None and rec.error.message == "kaput"


GROUP_SCRIPTS: set[str] = set()  # none is exempt


def _lua_field_literals(text: str) -> list[str]:
    hits = []
    for n, line in enumerate(text.splitlines(), 1):
        code = line.split("--", 1)[0]
        if "redis.call" not in code and "redis.pcall" not in code:
            continue
        for quoted in re.findall(r"'([^']*)'", code):
            if quoted in FIELDS:
                hits.append(f"line {n}: '{quoted}'")
    return hits


def test_lua_scripts_name_fields_through_the_layout_table() -> None:
    found = {}
    for d in LUA_DIRS:
        for path in sorted((ROOT / d).glob("*.lua")):
            rel = path.relative_to(ROOT).as_posix()
            if rel not in GROUP_SCRIPTS and (hits := _lua_field_literals(path.read_text())):
                found[rel] = hits
    assert found == {}
    assert _lua_field_literals("redis.call('HGET', KEYS[1], 'inc') -- 'seq'") == ["line 1: 'inc'"]
