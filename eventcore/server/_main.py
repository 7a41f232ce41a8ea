"""The ``eventcore`` console script: a one-line error when the ``server`` extra is missing."""

from __future__ import annotations

import sys

from eventcore._extras import require_extra
from eventcore.errors import MissingExtra


def main() -> None:
    try:
        require_extra("server", "the eventcore command")
    except MissingExtra as exc:
        print(f"eventcore: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    from ._cli import main as cli_main

    cli_main()
