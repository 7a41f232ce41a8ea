"""The one loader of eventcore's Lua scripts (every package's).

``lua(package, name)`` is the source of ``<package>/_lua/<name>.lua``, read through the
package (so it works from an installed wheel and from any working directory). Scripts that
write session entries or session state are loaded ``with_prelude``: the layout's constants
(:mod:`eventcore._layout`, as the Lua table ``L``) and the shared prelude
(``eventcore/_lua/prelude.lua``: one writer of session-stream + feed entries, of session
state, of dead letters and of the live notification) are joined in front of the script. The
result is sent as one script (EVALSHA of prelude..script): Redis 6.2 has no FUNCTION LOAD.

A Redis Cluster client whose nodes have sharded pub/sub (7.0+) registers every script through
:func:`sharded`, which makes the prelude's ``ec_publish`` send ``SPUBLISH``: a sharded message
is delivered by the node serving the channel's slot (the shard's) instead of being broadcast
to every node of the cluster, and listeners subscribe per node (:mod:`eventcore._channels`).
"""

from __future__ import annotations

import functools
import json
from importlib import resources

from . import _layout

__all__ = ["lua", "lua_layout", "sharded"]

_PUBLISH = "local EC_PUBLISH = 'PUBLISH'\n"
_SPUBLISH = "local EC_PUBLISH = 'SPUBLISH'\n"


def lua_layout() -> str:
    """The layout's constants as a Lua table ``L`` (one source for Python and Lua)."""
    items = ", ".join(f"{k} = {json.dumps(v)}" for k, v in sorted(_layout.constants().items()))
    return f"local L = {{{items}}}\n"


@functools.cache
def _prelude() -> str:
    text = resources.files("eventcore").joinpath("_lua/prelude.lua").read_text()
    return lua_layout() + text


@functools.cache
def lua(package: str, name: str, *, with_prelude: bool = False, with_layout: bool = False
        ) -> str:
    """The source of ``<package>/_lua/<name>.lua`` (``package`` as imported, e.g.
    ``eventcore.workers``), with the shared prelude in front when ``with_prelude``, or only the
    layout's table ``L`` when ``with_layout`` (scripts that read fields but write none)."""
    text = resources.files(package).joinpath(f"_lua/{name}.lua").read_text()
    if with_prelude:
        return _prelude() + text
    return lua_layout() + text if with_layout else text


def sharded(script: str) -> str:
    """``script`` as a Redis Cluster 7+ client runs it: the prelude's notifications sent with
    ``SPUBLISH`` (a script without the prelude is returned as it is)."""
    return script.replace(_PUBLISH, _SPUBLISH, 1)
