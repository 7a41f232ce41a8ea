"""Credentials: the API key (admin, every session) and signed, expiring session tokens.

Session tokens are JWTs (HS256, PyJWT) with claims ``sid`` (the one session they open), ``inc``
(its incarnation: the id created again after a delete is another session, which the token does
not open), ``scope`` (``rw``: read and write; ``read``: read only), ``iat`` and ``exp``,
audience ``eventcore:session``. The signing secret is ``EVENTCORE_TOKEN_SECRET`` or, unset, an
HMAC of the API key — so every API process with the same key accepts the same tokens.

Where credentials may come from:

- ``Authorization: Bearer <api key | session token>`` on every endpoint.
- ``?access_token=<token>`` on GET requests only, and only a **read-scoped** session token
  (``POST /v1/sessions/{id}/tokens``), because a browser ``EventSource`` cannot set headers.
  URLs end up in logs and histories, so the query token can read one session and nothing else,
  expires soon, is redacted from access logs (:class:`AccessLogRedactor`: by the parameter
  name as the server decodes it, so ``access%5Ftoken=`` is redacted too, and anything shaped
  like a token), and responses carry ``Referrer-Policy: no-referrer``. The API key is never
  accepted in a URL.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal
from urllib.parse import unquote_plus

import jwt

from eventcore.errors import ConfigError, SessionNotFound

from ._problems import Problem

if TYPE_CHECKING:
    from eventcore._log import EventLog

__all__ = ["AccessLogRedactor", "Auth", "Principal", "Scope", "check_incarnation", "redact"]

Scope = Literal["rw", "read"]
_AUDIENCE = "eventcore:session"
_ALGORITHM = "HS256"
_MAX_CREDENTIAL = 4096


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the admin (API key) or the holder of one session's token."""

    admin: bool
    session_id: str | None = None
    scope: Scope = "rw"
    expires_at: int | None = None
    incarnation: str = ""

    def may(self, session_id: str, *, write: bool) -> bool:
        if self.admin:
            return True
        return self.session_id == session_id and (self.scope == "rw" or not write)


class Auth:
    """Verifies credentials and mints session tokens."""

    def __init__(
        self, api_key: str | None, *, secret: str | None = None, token_ttl_s: int = 24 * 3600
    ) -> None:
        self.generated_key = api_key is None
        self.api_key = api_key if api_key is not None else secrets.token_urlsafe(32)
        if len(self.api_key) < 16:
            raise ConfigError("EVENTCORE_API_KEY must be at least 16 characters")
        key_material = (secret or self.api_key).encode()
        self._secret = hmac.new(key_material, b"eventcore session tokens v1",
                                hashlib.sha256).digest()
        self.token_ttl_s = token_ttl_s

    def mint(self, session_id: str, *, incarnation: str, scope: Scope = "rw",
             ttl_s: int | None = None) -> str:
        """A token for one incarnation of a session (``SessionInfo.incarnation``)."""
        now = int(time.time())
        claims = {"sid": session_id, "inc": incarnation, "scope": scope, "iat": now,
                  "exp": now + (self.token_ttl_s if ttl_s is None else ttl_s), "aud": _AUDIENCE}
        return jwt.encode(claims, self._secret, algorithm=_ALGORITHM)

    def verify(self, credential: str, *, from_query: bool = False) -> Principal:
        """The principal behind ``credential`` or a 401 :class:`Problem`."""
        if len(credential) > _MAX_CREDENTIAL:
            raise _unauthorized("the credential is too long")
        if hmac.compare_digest(credential.encode(), self.api_key.encode()):
            if from_query:
                raise _unauthorized("the API key is not accepted in a URL; use the "
                                    "Authorization header")
            return Principal(admin=True)
        try:
            claims = jwt.decode(
                credential, self._secret, algorithms=[_ALGORITHM], audience=_AUDIENCE,
                options={"require": ["sid", "scope", "exp", "iat", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise Problem(401, "token-expired", "the session token has expired",
                          headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
                          ) from None
        except jwt.PyJWTError:
            raise _unauthorized("the credential is neither the API key nor a valid "
                                "session token") from None
        sid, scope, inc = claims.get("sid"), claims.get("scope"), claims.get("inc", "")
        if not isinstance(sid, str) or scope not in ("rw", "read") or not isinstance(inc, str):
            raise _unauthorized("the session token's claims are malformed")
        if from_query and scope != "read":
            raise _unauthorized("only read-scoped tokens (POST /v1/sessions/{id}/tokens) are "
                                "accepted in a URL")
        return Principal(admin=False, session_id=sid, scope=scope,
                         expires_at=int(claims["exp"]), incarnation=inc)

    def sign(self, claims: dict[str, object], *, audience: str, ttl_s: int) -> str:
        """A token for another purpose than opening a session (e.g. a telephony call's URL),
        signed with the session tokens' secret under its own ``audience``, so neither kind is
        ever accepted as the other."""
        if audience == _AUDIENCE:
            raise ValueError("use mint() for session tokens")
        now = int(time.time())
        return jwt.encode({**claims, "iat": now, "exp": now + ttl_s, "aud": audience},
                          self._secret, algorithm=_ALGORITHM)

    def verify_signed(self, token: str, *, audience: str) -> dict[str, object]:
        """The claims of a :meth:`sign` token of ``audience``, or a 401 :class:`Problem`."""
        if len(token) > _MAX_CREDENTIAL:
            raise _unauthorized("the token is too long")
        try:
            claims: dict[str, object] = jwt.decode(
                token, self._secret, algorithms=[_ALGORITHM], audience=audience,
                options={"require": ["exp", "iat", "aud"]})
        except jwt.ExpiredSignatureError:
            raise Problem(401, "token-expired", "the token has expired") from None
        except jwt.PyJWTError:
            raise _unauthorized("the token is not valid here") from None
        return claims

    def from_header(self, authorization: str | None) -> Principal | None:
        if authorization is None:
            return None
        scheme, _, credential = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise _unauthorized("use `Authorization: Bearer <credential>`")
        return self.verify(credential.strip())


async def check_incarnation(principal: Principal, log: EventLog, session_id: str) -> None:
    """A session token opens the incarnation it was minted for and no other: once its session
    is deleted and the id created again, the old token gets 401 on every endpoint (GET, the
    SSE stream, inputs, signals...). Where the session is gone, :class:`SessionNotFound`."""
    if principal.admin:
        return
    current = (await log.incarnations([session_id]))[session_id]
    if current is None:
        raise SessionNotFound(session_id)
    if current != principal.incarnation:
        raise Problem(401, "unauthorized", "the session this token was issued for was deleted; "
                      "the id now names another session",
                      headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


def _unauthorized(detail: str) -> Problem:
    return Problem(401, "unauthorized", detail, headers={"WWW-Authenticate": "Bearer"})


# A name=value pair of a query string (or of bare text): what follows ?, &, ; or a delimiter.
_PAIR = re.compile(r"""(?:^|(?<=[?&;\s"'(\[,]))([^=&;\s"'?#]+)=([^&;\s"'#]*)""")
_JWT = re.compile(r"eyJ[\w-]{2,}\.[\w-]{2,}\.[\w-]{2,}", re.ASCII)
_NOT_NAME = re.compile(r"[^a-z0-9_]")


def _names_token(name: str) -> bool:
    """Whether a raw query parameter name means ``access_token``: judged on the name as the
    server decodes it (``%5F``, ``%61``, ``+``: Starlette unquotes names), and more loosely
    still (decoded again, any case, stray punctuation), since what a client meant as a token
    is one whichever spelling the server took."""
    for _ in range(4):
        decoded = unquote_plus(name)
        if decoded == name:
            break
        name = decoded
    return _NOT_NAME.sub("", name.casefold()) == "access_token"


def _redact_pair(m: re.Match[str]) -> str:
    return f"{m.group(1)}=[redacted]" if _names_token(m.group(1)) else m.group(0)


def redact(text: str) -> str:
    """Hide credentials in a URL or log line: every ``access_token`` value (however its name
    is percent-encoded or cased) and anything shaped like a session token."""
    if "=" in text:
        text = _PAIR.sub(_redact_pair, text)
    if "eyJ" in text:
        text = _JWT.sub("[redacted]", text)
    return text


class AccessLogRedactor(logging.Filter):
    """Installed on ``uvicorn.access`` (and anything else) so URLs are logged without tokens."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return True
