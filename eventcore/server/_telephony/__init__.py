"""Telephony media streams (Twilio, Telnyx, Plivo, Exotel) as sessions: one framing module per
provider and one dispatcher (``_dispatch``: ``POST /v1/telephony/start``, ``GET
/v1/telephony/ws``)."""

from ._dispatch import FRAMINGS, OUTPUT_TYPES, detect, router
from ._framing import CallStart

__all__ = ["FRAMINGS", "OUTPUT_TYPES", "CallStart", "detect", "router"]
