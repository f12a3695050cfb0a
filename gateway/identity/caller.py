"""Who sent a request, the same way for every transport.

HTTP passes its headers, gRPC its invocation metadata (lower-case keys in both); each passes the
peer's address. The rules (keys, the client-id header, the peer address) live here once.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable, Mapping

from bastion.gateway.errors import Forbidden, InvalidInput, Unauthorized
from bastion.gateway.identity.keys import KeyRing
from bastion.gateway.protocol.types import Caller
from bastion.gateway.settings import Settings

SCREENING_REPORT_SCOPE = "screening_report"
ADMIN_CLIENT = "admin"
"""The client the admin token stands for where client keys are required."""
_CLIENT_ID = re.compile(r"[A-Za-z0-9._~:@/+=-]+")


def token_matches(given: str, token: str) -> bool:
    """Constant-time comparison of an Authorization value with ``Bearer <token>``."""
    return bool(token) and hmac.compare_digest(given.encode(), f"Bearer {token}".encode())


def resolve_caller(
    settings: Settings,
    keys: KeyRing | None,
    headers: Mapping[str, str],
    peer: str | None,
    on_reject: Callable[[str], None] = lambda reason: None,
) -> Caller:
    """The caller of one request.

    With client keys configured: the key's client (no valid key: ``Unauthorized``, 401 /
    UNAUTHENTICATED; the admin token stands for the client ``admin``), or the client-id header
    when ``trust_client_header`` (a proxy authenticated the client; it must then name it).
    Without keys: the client-id header, else the peer address (``shared``: many clients may
    sit behind one address). The admin token adds the ``screening_report`` scope. A malformed
    client id is ``InvalidInput``. ``on_reject`` gets the reason of each refusal, for metrics.
    """
    authorization = headers.get("authorization")
    scopes: frozenset[str] = frozenset()
    if authorization and token_matches(authorization, settings.admin_token):
        scopes = frozenset({SCREENING_REPORT_SCOPE})
    keyed = keys is not None and keys.enabled
    if keyed and not settings.trust_client_header:
        assert keys is not None
        return Caller(_key_client(keys, authorization, scopes, on_reject), scopes)
    client_id = headers.get(settings.client_id_header)
    if client_id is not None:
        problem = None
        if not client_id:
            problem = "is empty"
        elif len(client_id) > settings.max_client_id_chars:
            problem = f"is over {settings.max_client_id_chars} characters"
        elif _CLIENT_ID.fullmatch(client_id) is None:
            problem = "may hold only letters, digits and ._~:@/+=-"
        if problem:
            on_reject("client_id")
            raise InvalidInput(f"header {settings.client_id_header} {problem}")
        return Caller(client_id, scopes)
    if keyed:  # a trusted proxy must name the client
        on_reject("client_key")
        raise Unauthorized(f"header {settings.client_id_header} is required")
    if peer:
        return Caller(peer, scopes, shared=True)
    return Caller(None, scopes)


def _key_client(
    keys: KeyRing,
    authorization: str | None,
    scopes: frozenset[str],
    on_reject: Callable[[str], None],
) -> str:
    if scopes:
        return ADMIN_CLIENT
    scheme, _, key = (authorization or "").partition(" ")
    client = keys.client_of(key) if scheme.lower() == "bearer" else None
    if client is None:
        on_reject("client_key")
        raise Unauthorized("a valid client key is required: 'Authorization: Bearer <key>'")
    return client


def check_admin(settings: Settings, authorization: str | None) -> None:
    """Admin actions need ``Bearer <admin_token>``. Raises ``Forbidden`` (403 /
    PERMISSION_DENIED) without it, and when no admin token is set (admin actions disabled)."""
    if not settings.admin_token:
        raise Forbidden("admin actions are disabled: set BASTION_ADMIN_TOKEN to enable them")
    if not authorization:
        raise Forbidden("this action needs 'Authorization: Bearer <admin token>'")
    if not token_matches(authorization, settings.admin_token):
        raise Forbidden("the admin token given is wrong (this action needs the admin token)")
